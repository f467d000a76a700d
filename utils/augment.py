"""Augmented training batches from one of three engines, picked by `batches`.

layers: one random warp per image and CutMix inside tf.data (engine_tf, the default on TensorFlow);
numpy: the same batches made by NumPy and PIL, for the JAX backend without TensorFlow (engine_numpy);
idg: Keras's ImageDataGenerator in worker processes, at one image size (engine_idg).
"""

from utils.engine_idg import idg_batches
from utils.engine_numpy import array_batches, resize_array
from utils.engine_tf import resize, warped_batches
from utils.warps import batch_plan

ENGINES = ("layers", "numpy", "idg")


def batches(engine, x, y, w, batch_size, seed, sizes, first_epoch, strength, mix, workers, part):
    """The training batches of epochs first_epoch.. for the engine: images x (array or DiskImages), targets y,
    weights w or None; sizes: the image size of each epoch; strength: of the warps; mix: CutMix's share of
    the batches; workers: threads or processes that prepare them; part: (process i, of n) for --processes."""
    if engine == "idg":
        return idg_batches(x, y, w, batch_size, seed, workers, strength)
    plan = batch_plan(len(y), batch_size, seed, sizes, first_epoch, part)
    if engine == "layers":
        return warped_batches(x, y, w, plan, strength, mix)
    return array_batches(x, y, w, plan, strength, mix, workers)


def resizer(engine):
    """How validation images are resized for an engine, as its training batches are: the NumPy engine by PIL
    (resize_array), the others by TensorFlow (resize)."""
    return resize_array if engine == "numpy" else lambda images, size: resize(images, size).numpy()
