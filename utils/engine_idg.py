"""The classic augmentation engine: Keras's ImageDataGenerator in worker processes."""

import os
import signal

import numpy as np

from utils.backend import import_keras
from utils.warps import AUGMENTATION


def idg_batches(x, y, w, batch_size, seed, workers, strength):
    """Augmented batches from Keras's ImageDataGenerator, run in worker processes (no GIL)."""
    keras = import_keras()
    import tensorflow as tf  # Keras 3 keeps ImageDataGenerator only under tf.keras

    a = AUGMENTATION
    generator = tf.keras.preprocessing.image.ImageDataGenerator(
        rotation_range=a["rotation"] * strength * 360,
        width_shift_range=a["translation"] * strength,
        height_shift_range=a["translation"] * strength,
        zoom_range=a["zoom"] * strength,
        horizontal_flip=bool(a["horizontal_flip"]),  # random: ImageDataGenerator cannot alternate
        fill_mode=a["fill_mode"],
    )
    parent = os.getpid()

    class Batches(keras.utils.PyDataset):
        """Shuffled, augmented batches; each batch is seeded from (seed, epoch, index)."""

        def __init__(self):
            super().__init__(workers=workers, use_multiprocessing=workers > 1, max_queue_size=16)
            self.epoch = 0
            self.order = np.random.default_rng(seed).permutation(len(x))

        def __len__(self):
            return len(x) // batch_size  # drop the ragged last batch

        def __getitem__(self, i):
            if os.getpid() != parent:  # a worker: Ctrl-C is for the main process to report
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            idx = self.order[i * batch_size : (i + 1) * batch_size]
            rng = np.random.default_rng([seed, self.epoch, i])
            batch = [generator.random_transform(x[j].astype("float32"), seed=int(rng.integers(2**31))) for j in idx]
            return (np.stack(batch), y[idx]) if w is None else (np.stack(batch), y[idx], w[idx])

        def on_epoch_end(self):
            self.epoch += 1
            self.order = np.random.default_rng([seed, self.epoch]).permutation(len(x))

    return Batches()
