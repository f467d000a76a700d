"""Train the cats-vs-dogs CNN on the split that prepare_data.py wrote.

    python train.py                     # data/processed -> models/
    python train.py --epochs 2 --resume # continue an interrupted run in the same --out

1. Load each split once into memory at --image-size (the same load_image that predict.py uses).
2. Augment training batches with Keras's ImageDataGenerator in worker processes,
   so augmentation overlaps the network's compute.
3. Fit with RMSprop and a cosine learning-rate decay; keep the best epoch by validation accuracy.
4. Evaluate that best model on the test split and save the model, history and metrics.
"""

import argparse
import csv
import json
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from utils import (
    CLASS_NAMES,
    DATA_DIR,
    IMAGE_SIZE,
    MODEL_DIR,
    MODEL_FILE,
    UserError,
    atomic_write,
    build_model,
    fail,
    import_keras,
    list_images,
    load_image,
    write_json,
)

# ImageDataGenerator's random transforms for training images; users tune them here.
# Milder than the original notebook's (rotation 40, shifts/shear/zoom 0.2), which slowed learning.
AUGMENTATION = dict(
    rotation_range=15,
    width_shift_range=0.1,
    height_shift_range=0.1,
    shear_range=0.1,
    zoom_range=0.15,
    horizontal_flip=True,
    fill_mode="nearest",
)
RESUMABLE = ("epochs", "batch_size", "image_size", "learning_rate", "seed", "data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA_DIR, help="folder with train/ val/ test/ (default: %(default)s)")
    p.add_argument(
        "--out", type=Path, default=MODEL_DIR, help="where the model and its files go (default: %(default)s)"
    )
    p.add_argument("--epochs", type=int, default=15, help="passes over the training split (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per training step (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="pixels per side (default: %(default)s)")
    p.add_argument(
        "--learning-rate",
        type=float,
        default=2e-3,
        help="RMSprop's starting rate, decayed along a cosine to 0 (default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=42, help="seed of weights, shuffling and augmentation (default: %(default)s)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="processes that augment batches while the network trains; 1 = in the main process (default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --out from its last finished epoch (same flags required); "
        "without it, an unfinished run there is discarded and training starts afresh",
    )
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs to OUT/logs")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "image_size", "workers"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_size < 32:
        p.error("--image-size must be at least 32 (the network halves it four times)")
    return args


# --- 1. data -------------------------------------------------------------------
def load_split(data, split, size):
    """All images of one split as (uint8 array N x size x size x 3, float labels, paths)."""
    folder = data / split
    paths, labels = [], []
    for label, cls in enumerate(CLASS_NAMES):
        files = list_images(folder / cls)
        if not files:
            raise UserError(f"{folder / cls} has no images; run `python prepare_data.py --out {data}` first")
        paths += files
        labels += [label] * len(files)
    with ThreadPoolExecutor() as pool:  # PIL decodes without holding the GIL
        images = np.stack(list(pool.map(lambda p: load_image(p, size), paths)))
    return images, np.array(labels, dtype="float32"), paths


def idg_batches(x, y, batch_size, seed, workers):
    """Augmented batches from Keras's ImageDataGenerator, run in worker processes (no GIL)."""
    keras = import_keras()
    import tensorflow as tf  # Keras 3 keeps ImageDataGenerator only under tf.keras

    generator = tf.keras.preprocessing.image.ImageDataGenerator(**AUGMENTATION)
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
            return np.stack(batch), y[idx]

        def on_epoch_end(self):
            self.epoch += 1
            self.order = np.random.default_rng([seed, self.epoch]).permutation(len(x))

    return Batches()


def atomic_backup_class():
    keras = import_keras()

    class AtomicBackup(keras.callbacks.BackupAndRestore):
        """Keras's BackupAndRestore, but each file is replaced by a rename, so kill -9 while it
        saves leaves the previous backup rather than half a file (which Keras cannot load)."""

        def _save_model(self):
            atomic_write(self._weights_path, lambda tmp: self.model.save_weights(tmp, overwrite=True))
            # metadata after weights: it never claims an epoch the weights do not have
            write_json(self._training_metadata_path, {"epoch": self._current_epoch, "batch": self._last_batch_seen})

    return AtomicBackup


# --- 2. bookkeeping ---------------------------------------------------------------
def read_log(path):
    """Epoch rows of the CSV log, each epoch once (a row written twice around a crash counts once)."""
    if not path.exists():
        return []
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            rows[int(row["epoch"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    return [rows[e] for e in sorted(rows)]


def main(argv=None):
    args = parse_args(argv)
    # Ctrl-C must reach us even when started from a shell that ignores it (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out, work = args.out, args.out / ".run"  # .run holds the unfinished run's backup and log
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in RESUMABLE}
    try:
        if args.resume:
            if not (work / "config.json").exists():
                raise UserError(f"nothing to resume in {out}; run without --resume to start training")
            saved = json.loads((work / "config.json").read_text())
            diff = [
                f"--{k.replace('_', '-')} {saved.get(k)} (now {config[k]})" for k in config if saved.get(k) != config[k]
            ]
            if diff:
                raise UserError(f"--resume needs the flags of the interrupted run: {', '.join(diff)}")
        return train(args, out, work, config)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        done = len(read_log(work / "log.csv"))
        flags = " ".join(sys.argv[1:]).replace("--resume", "").strip()
        fail(
            f"interrupted after {done} finished epoch(s) of {args.epochs}; "
            f"continue with: python train.py {flags} --resume".replace("  ", " "),
            code=130,
        )


def train(args, out, work, config):
    if not args.data.is_dir():
        raise UserError(f"{args.data} does not exist; run `python prepare_data.py` first")
    started = time.perf_counter()
    x_train, y_train, _ = load_split(args.data, "train", args.image_size)
    x_val, y_val, _ = load_split(args.data, "val", args.image_size)
    x_test, y_test, test_paths = load_split(args.data, "test", args.image_size)
    if len(x_train) < args.batch_size:
        raise UserError(
            f"{args.data}/train has {len(x_train)} images, fewer than --batch-size {args.batch_size}; "
            "lower --batch-size or prepare more images"
        )
    print(
        f"loaded train {len(x_train)}, val {len(x_val)}, test {len(x_test)} images "
        f"at {args.image_size}px in {time.perf_counter() - started:.1f} s",
        flush=True,
    )

    keras = import_keras()

    keras.utils.set_random_seed(args.seed)
    AtomicBackup = atomic_backup_class()
    if not args.resume:  # only now that the data is good: a refused run leaves an unfinished one alone
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "config.json", config)
    batches = idg_batches(x_train, y_train, args.batch_size, args.seed, args.workers)
    steps = len(x_train) // args.batch_size
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, decay_steps=args.epochs * steps)
    model = build_model(args.image_size)
    model.compile(
        optimizer=keras.optimizers.RMSprop(schedule),
        loss="binary_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,
    )  # XLA was slower on CPU here

    previous = read_log(work / "log.csv")
    offset = previous[-1]["elapsed_seconds"] if previous else 0.0
    clock = time.perf_counter()
    # One file per improvement, named by epoch: the best logged epoch's file is always whole.
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(work / "best-{epoch:03d}.keras"), monitor="val_accuracy", save_best_only=True
    )
    if previous:  # the best-so-far must survive the resume, not restart from -inf
        checkpoint.best = max(r["val_accuracy"] for r in previous)
    callbacks = [
        keras.callbacks.LambdaCallback(
            # Keras prints "Epoch N/M" only when M > 1; a 1-epoch run gets the same line from here.
            on_epoch_begin=lambda epoch, logs: print("Epoch 1/1", flush=True) if args.epochs == 1 else None,
            on_epoch_end=lambda epoch, logs: logs.update(
                elapsed_seconds=round(offset + time.perf_counter() - clock),
                learning_rate=float(model.optimizer.learning_rate),  # where the schedule is after this epoch
            ),
        ),
        # Order matters for kill -9: an epoch is logged only after its checkpoint is complete, and a
        # logged epoch whose backup is missing is simply trained again (read_log keeps it once).
        checkpoint,
        keras.callbacks.CSVLogger(str(work / "log.csv"), append=True),
        AtomicBackup(str(work / "backup")),
    ]
    if args.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(out / "logs")))
    model.fit(
        batches,
        validation_data=(x_val, y_val),
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=1 if sys.stdout.isatty() else 2,
    )  # a progress bar on a terminal, a line per epoch in logs
    train_seconds = offset + time.perf_counter() - clock

    # Evaluate the best epoch on the test split, then move every result into place.
    log = read_log(work / "log.csv")
    keys = ["accuracy", "val_accuracy", "loss", "val_loss", "learning_rate", "elapsed_seconds"]
    history = {k: [r[k] for r in log if k in r] for k in keys}
    history = {k: v for k, v in history.items() if v}
    best_epoch = int(np.argmax(history["val_accuracy"]))
    best_file = work / f"best-{best_epoch + 1:03d}.keras"
    best = keras.models.load_model(best_file)
    prob = best.predict(x_test, batch_size=256, verbose=0).ravel()
    metrics = {
        "test_accuracy": round(float(np.mean((prob > 0.5) == (y_test > 0.5))), 4),
        "test_loss": round(float(keras.losses.binary_crossentropy(y_test, prob).numpy().mean()), 4),
        "test_images": len(y_test),
        "train_images": len(x_train),
        "val_images": len(x_val),
        "best_epoch": best_epoch + 1,
        "best_val_accuracy": round(history["val_accuracy"][best_epoch], 4),
        "epochs": len(log),
        "train_seconds": round(train_seconds, 1),
        "train_images_per_second": round(len(log) * steps * args.batch_size / train_seconds, 1),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "parameters": best.count_params(),
    }
    predictions = [
        {"path": str(p), "label": int(t), "dog_probability": round(float(q), 4)}
        for p, t, q in zip(test_paths, y_test, prob, strict=True)
    ]
    atomic_write(out / MODEL_FILE, lambda tmp: shutil.copyfile(best_file, tmp))
    write_json(out / "history.json", history)
    write_json(out / "test_predictions.json", predictions)
    write_json(out / "metrics.json", metrics)
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"test accuracy {metrics['test_accuracy']:.4f} on {len(y_test)} images (best epoch {best_epoch + 1}, "
        f"val {metrics['best_val_accuracy']:.4f}); {train_seconds:.0f} s of training; saved {out / MODEL_FILE}"
    )
    return metrics


if __name__ == "__main__":
    main()
