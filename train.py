"""Train the CNN on the split that prepare_data.py wrote: cats and dogs, or any classes.

    python train.py                     # data/processed -> models/
    python train.py --data data/flowers --out models/flowers
    python train.py --epochs 2 --resume # continue an interrupted run in the same --out

0. recipe:   the settings that depend on the data (epochs, warm-up, weight averaging, augmentation
             strength) are derived from the number of training images (`recipe`).
1. data:     the classes from the split's report.json; each split loaded once into memory at
             --image-size (the same load_image that predict.py uses).
2. batches:  shuffle and augment training batches (one random warp per image in tf.data; the same
             in NumPy for JAX without TensorFlow; or ImageDataGenerator in worker processes);
             progressive resizing trains the early epochs on smaller images, which are cheaper, and
             the last ones at full size.
3. model:    the CNN of utils.build_model, RMSprop warmed up then decayed along a cosine, label
             smoothing, an exponential moving average of the weights, bfloat16 where the CPU has it.
4. fit:      each epoch is validated with the averaged weights; the best epoch is kept.
5. evaluate: the best weights on the test split, each photo averaged with its mirror (as utils.class_probabilities).
6. save:     the model in float32 at the final size (.keras and its LiteRT copy .tflite, both carrying the
             class names; labels.txt beside them), history, metrics.
"""

import argparse
import contextlib
import csv
import json
import mmap
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from utils import (
    DATA_DIR,
    IMAGE_SIZE,
    LABELS_FILE,
    MIRROR_TTA,
    MODEL_DIR,
    SPLITS,
    WIDTHS,
    DiskFull,
    Progress,
    UserError,
    atomic_write,
    available_memory,
    build_model,
    check_space,
    choose_backend,
    choose_precision,
    class_names_layer,
    cpu_has_bf16,
    cpu_model,
    exclusive,
    explaining_model,
    fail,
    gpu_facts,
    has_tensorflow,
    import_keras,
    is_disk_full,
    labels_bytes,
    list_images,
    load_image,
    megabytes,
    model_files,
    names_of_keras_model,
    pack_labels,
    plain_and_mirrored,
    quiet_stderr,
    split_classes,
    write_json,
)

PROCESS_START = time.perf_counter()  # time to accuracy counts from here

# Random transforms of training images, the one place to tune them. Both engines read this dict:
# rotation as a fraction of a full turn, translation and zoom as fractions of the image side.
AUGMENTATION = dict(
    horizontal_flip=True,
    rotation=0.04,  # +-14 degrees
    translation=0.1,
    zoom=0.15,
    fill_mode="nearest",
)
# The recipe was tuned on the cats-and-dogs split: 18,380 training images, 287 steps of 64 an epoch,
# 30 epochs, a one-epoch warm-up, weight averaging over about 100 steps (0.99). `recipe` scales the settings
# that depend on the data from there, so that split gets exactly those and a smaller one gets more epochs
# (each sees fewer images), a warm-up of at least WARMUP_STEPS, a weight average over about one of its
# shorter epochs, BatchNorm statistics over a third of one, stronger augmentation and CutMix.
REFERENCE_IMAGES = 18_380
REFERENCE_EPOCHS = 30
WARMUP_STEPS = 200
BN_EPOCHS = 0.35  # BatchNorm statistics' window, in epochs (1 / (1 - momentum) steps)
EMA_STEPS = 100  # the weight average's window: one epoch, at most this many steps
MAX_SCALE = 3.0  # a split this many times smaller in square root gets at most 3x the epochs
MAX_AUGMENT = 2.0  # and at most twice the warps
MAX_CUTMIX = 0.5  # and CutMix on at most half of the batches


def recipe(train_images, batch_size, epochs=None):
    """Settings derived from the split's size: {epochs, warmup_steps, ema, bn_momentum, augment}.
    epochs: the number given by hand, which the warm-up then depends on."""
    steps = max(1, train_images // batch_size)
    scale = min(MAX_SCALE, max(1.0, (REFERENCE_IMAGES / max(train_images, 1)) ** 0.5))
    epochs = epochs or round(REFERENCE_EPOCHS * scale)
    return {
        "epochs": epochs,
        # one epoch, or WARMUP_STEPS where that is at most a tenth of the run
        "warmup_steps": max(steps, min(WARMUP_STEPS, epochs * steps // 10)),
        "ema": round(1 - 1 / max(10, min(EMA_STEPS, steps)), 2),
        "bn_momentum": round(min(0.99, 1 - 1 / max(10.0, BN_EPOCHS * steps)), 3),
        "augment": round(min(MAX_AUGMENT, scale), 2),
        "cutmix": round(min(MAX_CUTMIX, (scale - 1) * MAX_CUTMIX / 2), 2),
    }


# The recipe's settings, printed at the start and kept in metrics.json
RECIPE = ("epochs", "warmup_steps", "ema", "bn_momentum", "augment", "cutmix", "class_weights")
# Flags that must be the same for --resume to continue a run.
RESUMABLE = (
    "epochs",
    "batch_size",
    "image_size",
    "learning_rate",
    "seed",
    "data",
    "engine",
    "progressive",
    "label_smoothing",
    "ema",
    "precision",
    "warmup_steps",
    "bn_momentum",
    "augment",
    "cutmix",
    "class_weights",
    "width",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA_DIR, help="folder with train/ val/ test/ (default: %(default)s)")
    p.add_argument(
        "--out", type=Path, default=MODEL_DIR, help="where the model and its files go (default: %(default)s)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        help=f"passes over the training split (default: {REFERENCE_EPOCHS} for {REFERENCE_IMAGES:,} training images "
        f"or more, up to {MAX_SCALE:g}x that for smaller splits, by the square root of how much smaller)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per training step (default: %(default)s)")
    p.add_argument(
        "--image-size",
        type=int,
        default=IMAGE_SIZE,
        help="pixels per side of the finished model, and of the last epochs (default: %(default)s)",
    )
    p.add_argument(
        "--progressive",
        type=float,
        default=0.7,
        help="share of the epochs trained on smaller images, in equal parts from about half of --image-size "
        "up in 32 px steps (64, 96 and 128 px for 160); 0 trains every epoch at --image-size (default: %(default)s)",
    )
    p.add_argument(
        "--width",
        type=float,
        default=1.0,
        help="filters of the network's blocks times this (32, 64, 128, 256 at 1: 1.18 M parameters) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--learning-rate",
        type=float,
        default=2e-3,
        help="RMSprop's peak rate, reached after the warm-up, then decayed along a cosine to 0 (default: %(default)s)",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        help="steps of the linear warm-up of the learning rate (default: one epoch, or "
        f"{WARMUP_STEPS} where that is more and at most a tenth of the run)",
    )
    p.add_argument(
        "--label-smoothing",
        type=float,
        default=0.05,
        help="the targets move e of the way to uniform: 0/1 become e/2 and 1-e/2 for two classes, "
        "e/N and 1-e+e/N for N (default: %(default)s)",
    )
    p.add_argument(
        "--ema",
        type=float,
        help="momentum of the moving average of the weights that is validated and saved; 0 turns it off "
        f"(default: an average over one epoch, at most {EMA_STEPS} steps: 0.99 for 287 steps an epoch, 0.97 for 31)",
    )
    p.add_argument(
        "--bn-momentum",
        type=float,
        help="momentum of BatchNormalization's moving statistics, which validation and the saved model use "
        f"(default: an average over {BN_EPOCHS:g} of an epoch, at most 0.99: 0.99 for 287 steps an epoch, 0.908 "
        "for 31, so a small split's statistics keep up with its weights)",
    )
    p.add_argument(
        "--augment",
        type=float,
        help="strength of the random warps: rotation, shift and zoom of AUGMENTATION times this (default: 1 for "
        f"{REFERENCE_IMAGES:,} training images or more, up to {MAX_AUGMENT:g} for smaller splits)",
    )
    p.add_argument(
        "--cutmix",
        type=float,
        help="share of the training batches mixed by CutMix (a box of each image pasted from another, labels mixed "
        f"by area) (default: 0 for {REFERENCE_IMAGES:,} training images or more, up to {MAX_CUTMIX:g} for smaller "
        "splits)",
    )
    p.add_argument(
        "--class-weights",
        choices=("none", "balanced"),
        default="none",
        help="balanced: weigh each training image by n / (classes x images of its class), so a class with few "
        "images counts as much as one with many; none: every image 1. On flowers cut to 100 and 200 photos in "
        "two classes, none gave the higher macro-F1 with two seeds (README) (default: %(default)s)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "float32", "mixed_bfloat16", "mixed_float16"),
        default="auto",
        help="compute type: auto = mixed_float16 on GPUs of compute capability 7.0 or more, float32 on older "
        "GPUs, and without a GPU mixed_bfloat16 on CPUs with AVX512_BF16 or AMX, float32 elsewhere "
        "(utils.choose_precision; default: %(default)s)",
    )
    p.add_argument(
        "--engine",
        choices=("layers", "numpy", "idg"),
        help="augmentation: layers = one random warp per image in tf.data (train.augment); numpy = the same warps "
        "and CutMix by NumPy in a keras.utils.PyDataset, in --workers threads, which needs no TensorFlow (JAX "
        "backend); idg = ImageDataGenerator in --workers processes (trains at --image-size only) "
        "(default: layers, or numpy where TensorFlow is not installed)",
    )
    p.add_argument(
        "--seed", type=int, default=42, help="seed of weights, shuffling and augmentation (default: %(default)s)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="--engine idg: processes, --engine numpy: threads that augment batches while the network trains; "
        "1 = in the main process (default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the unfinished run in --out from its last finished epoch (same flags required); "
        "without it, an unfinished run there is discarded and training starts afresh",
    )
    p.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="train data-parallel on N devices, --batch-size split between them: N GPUs, or on a machine without "
        "one N logical devices of its CPU (tf.distribute.MirroredStrategy; with KERAS_BACKEND=jax, "
        "keras.distribution.DataParallel) (default: every GPU, else 1)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="JAX backend: train data-parallel in N processes, on several hosts or on one, each started with the "
        "same flags and its own --process-id; together they train on every device of every process (jax.distributed "
        "through keras.distribution.initialize), each feeding its share of --batch-size (default: %(default)s)",
    )
    p.add_argument(
        "--process-id",
        type=int,
        default=0,
        metavar="I",
        help="with --processes: this process's number, 0 to N-1; process 0 writes --out, process I>0 its own "
        "copy of the run (the .keras, not the .tflite) to OUT/.process-I (default: %(default)s)",
    )
    p.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="with --processes: the address where process 0 listens for the others (a port free on that host)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="read the images from disk each epoch (decoded once into DATA/.cache) instead of holding them in "
        "memory; train.py does so by itself when they do not fit",
    )
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs to OUT/logs")
    p.add_argument(
        "--export",
        type=Path,
        metavar="MODEL.keras",
        help="train nothing: write the LiteRT copy (.tflite, with heat maps and class names) of a .keras model "
        "from train.py beside it, e.g. to refresh a .tflite from before predict.py --explain",
    )
    args = p.parse_args(argv)
    args.engine = args.engine or ("layers" if has_tensorflow() else "numpy")
    if args.engine in ("layers", "idg") and not has_tensorflow():
        p.error(f"--engine {args.engine} needs TensorFlow, which is not installed here; use --engine numpy")
    for name in ("epochs", "batch_size", "image_size", "workers", "warmup_steps", "devices", "processes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_size < 32:
        p.error("--image-size must be at least 32 (the network halves it five times)")
    if not 0 <= args.progressive < 1:
        p.error("--progressive must be in [0, 1)")
    if args.width <= 0:
        p.error("--width must be above 0")
    if args.augment is not None and args.augment < 0:
        p.error("--augment must be 0 or more")
    if args.cutmix is not None and not 0 <= args.cutmix <= 1:
        p.error("--cutmix must be in [0, 1]")
    if args.engine == "idg" and args.cutmix:
        p.error("--engine idg does not mix batches; add --cutmix 0")
    if not 0 <= args.label_smoothing < 1 or not 0 <= (args.ema or 0) < 1 or not 0 <= (args.bn_momentum or 0) < 1:
        p.error("--label-smoothing, --ema and --bn-momentum must be in [0, 1)")
    if args.devices and args.batch_size % args.devices:
        p.error(f"--batch-size {args.batch_size} must split evenly between --devices {args.devices}")
    if args.processes > 1:
        if backend() != "jax":
            p.error("--processes trains on the JAX backend: start each process with KERAS_BACKEND=jax")
        if not args.coordinator:
            p.error("--processes needs --coordinator HOST:PORT, the address of process 0")
        if args.engine == "idg":
            p.error("--engine idg does not split batches between processes; use --engine numpy or layers")
        if not 0 <= args.process_id < args.processes:
            p.error(f"--process-id must be 0 to {args.processes - 1}")
        if args.batch_size % (args.processes * (args.devices or 1)):
            p.error(f"--batch-size {args.batch_size} must split evenly between the processes' devices")
        if args.process_id:
            args.out = args.out / f".process-{args.process_id}"
    elif args.process_id or args.coordinator:
        p.error("--process-id and --coordinator go with --processes N (N > 1)")
    if args.engine == "idg" and args.progressive:
        p.error("--engine idg trains at one size; add --progressive 0")
    if args.engine == "numpy" and not args.export and backend() == "tensorflow":
        # There Keras turns a PyDataset into tf.data, which fixes its shapes from the first batches and reads
        # ahead across epochs: the tf.data engine is the one for TensorFlow.
        p.error(
            "--engine numpy feeds the JAX backend; on TensorFlow leave --engine out (tf.data, the default "
            "there, makes the same batches)"
        )
    return args


def image_sizes(final, epochs, progressive):
    """Training image size of each epoch: the first `progressive` share of the epochs climb from half
    of `final` in 32 px steps (64, 96 for 128), the rest train at `final`."""
    small = list(range(max(32, final // 2 // 32 * 32), final, 32))
    n_small = round(progressive * epochs) if small else 0
    sizes = [small[i * len(small) // n_small] for i in range(n_small)] if n_small else []
    return sizes + [final] * (epochs - n_small)


# --- 1. data -------------------------------------------------------------------
def list_split(data, split, folders):
    """(paths, labels) of one split's images, label i for the images in folders[i]."""
    folder = data / split
    paths, labels = [], []
    for label, cls in enumerate(folders):
        files = list_images(folder / cls)
        if not files:
            raise UserError(f"{folder / cls} has no images; run `python prepare_data.py --out {data}` first")
        paths += files
        labels += [label] * len(files)
    return paths, labels


def check_memory(counts, size, batch_size, stream=False):
    """True when the splits fit in memory beside a training step; False when only streaming them from disk
    fits (or stream is asked for); UserError, before loading, when not even a streamed step fits."""

    def need(s, streamed):
        images = 0 if streamed else (2 * counts[0] + sum(counts[1:])) * s * s * 3  # train twice (numpy, TF)
        activations = batch_size * s * s * 1000  # what one step keeps for its backward pass, about 1 kB a pixel
        return images + activations + 1.5e9  # and TensorFlow itself

    available = available_memory()
    if available is None or need(size, stream) <= available:
        return not stream
    if need(size, True) <= available:
        return False
    smaller = next((s for s in (192, 160, 128, 96, 64, 48, 32) if s < size and need(s, True) <= available), None)
    hint = f"lower --image-size ({smaller} px needs {megabytes(need(smaller, True))})" if smaller else "free memory"
    raise UserError(
        f"training at {size} px, {batch_size} a step, needs about {megabytes(need(size, True))} of memory "
        f"even with the images streamed from disk, and {megabytes(available)} is available; {hint}"
    )


class DiskImages:
    """A split decoded once into a cache file of size x size x 3 uint8 pixels per image, read back by index
    (like an array: x[indices], x[i:j], len(x), x.shape). For splits larger than memory: reads go through
    os.pread, so nothing read stays in the process's memory, and worker processes may share it."""

    def __init__(self, path, count, size):
        self.path, self.shape, self.record = Path(path), (count, size, size, 3), size * size * 3
        self.fd, self.pid = None, None

    def __len__(self):
        return self.shape[0]

    def __getstate__(self):
        return {**self.__dict__, "fd": None, "pid": None}  # a worker opens its own

    def read(self, first, count):
        if self.pid != os.getpid():
            self.fd, self.pid = os.open(self.path, os.O_RDONLY), os.getpid()
        data = os.pread(self.fd, count * self.record, first * self.record)
        if len(data) != count * self.record:
            raise UserError(f"{self.path} is cut short; remove it and train again to rebuild it")
        return np.frombuffer(data, np.uint8).reshape(count, *self.shape[1:])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self.read(start, max(stop - start, 0))[::step].copy()
        index = np.asarray(index)
        images = np.empty((len(index), *self.shape[1:]), np.uint8)
        for k in np.argsort(index):  # read in file order, handed back in the order asked for
            images[k] = self.read(int(index[k]), 1)[0]
        return images


def cache_split(paths, labels, size, data, split):
    """One split decoded at size into data/.cache (once: a later run with the same files reuses it), as
    (DiskImages, labels, paths). The file is written whole or not at all, with progress shown."""
    import hashlib

    stamp = hashlib.sha256(
        "\n".join(f"{p}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in paths).encode()
    ).hexdigest()[:16]
    path = data / ".cache" / f"{split}-{size}px-{len(paths)}-{stamp}.u8"
    if not path.exists():
        for old in path.parent.glob(f"{split}-{size}px-*.u8"):  # the same split's cache of other files
            old.unlink()
        progress = Progress(len(paths), f"decoding {split} to {path}")

        def write(tmp):
            with open(tmp, "wb") as f:
                for i in range(0, len(paths), 1024):
                    f.write(load_images(paths[i : i + 1024], size).data)
                    progress.update(len(paths[i : i + 1024]))

        atomic_write(path, write, need=len(paths) * size * size * 3)
    return DiskImages(path, len(paths), size), np.array(labels, dtype="int32"), paths


def resizer(engine):
    """How validation images are resized for an engine, as its training batches are: the NumPy engine by PIL
    (resize_array), the others by TensorFlow (resize)."""
    return resize_array if engine == "numpy" else lambda images, size: resize(images, size).numpy()


def chunks(images, size=None, n=512, engine="layers"):
    """The images (array or DiskImages) n at a time, as float32 at side length size (default: as they are)."""
    for i in range(0, len(images), n):
        chunk = images[i : i + n]
        yield chunk if size in (None, chunk.shape[1]) else resizer(engine)(chunk, size)


def evaluate(model, images, size=None, engine="layers"):
    """(plain, mirror-averaged) class probabilities of the images (utils.plain_and_mirrored), a chunk at a
    time, so a streamed split never sits in memory whole."""
    parts = [plain_and_mirrored(batched(model), chunk) for chunk in chunks(images, size, engine=engine)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([b for _, b in parts])


def load_images(paths, size):
    """The images decoded at size (load_image) into one uint8 array N x size x size x 3.

    On Linux, one forked process per core decodes every k-th image into memory shared with this one
    (threads hold one GIL for much of PIL's work: on 2 cores they took 2.5x as long, benchmarks/load_speed.py;
    sending the pixels back from a process pool cost about half as much as decoding them). Call it before
    TensorFlow or JAX start their threads, which fork does not copy. A worker that fails leaves its images to this
    process, which decodes them itself, so a bad file raises here as usual, naming the file."""
    count = len(paths)
    shared = mmap.mmap(-1, max(count, 1) * size * size * 3)  # MAP_SHARED: the workers' writes land here
    images = np.frombuffer(shared, np.uint8, count * size * size * 3).reshape(count, size, size, 3)

    def decode(indices):
        for i in indices:
            try:
                images[i] = load_image(paths[i], size)
            except UserError as e:
                raise type(e)(f"{paths[i]}: {e}; run prepare_data.py again to rebuild the split") from None

    workers = min(len(os.sched_getaffinity(0)), count // 16) if sys.platform == "linux" else 1
    if workers < 2:
        decode(range(count))
        return images
    pids, failed = {}, []
    try:
        for w in range(workers):
            if (pid := os.fork()) == 0:  # the worker: decodes its share and exits, never returns
                code = 1
                try:
                    decode(range(w, count, workers))
                    code = 0
                finally:
                    os._exit(code)
            pids[pid] = w
        while pids:
            pid = next(iter(pids))
            if os.waitpid(pid, 0)[1]:
                failed.append(pids[pid])
            del pids[pid]
    finally:
        for pid in pids:  # interrupted (Ctrl-C): stop the other workers too
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    decode([i for w in failed for i in range(w, count, workers)])
    return images


def load_split(paths, labels, size):
    """All images of one split as (uint8 array N x size x size x 3, int labels, paths)."""
    return load_images(paths, size), np.array(labels, dtype="int32"), paths


def targets(labels, classes):
    """What the loss compares the model's output with: the label itself for two classes (one sigmoid
    unit), one-hot rows for more (softmax)."""
    if classes == 2:
        return labels.astype("float32")
    return np.eye(classes, dtype="float32")[labels]


def sample_weights(labels, classes, how):
    """Each training image's weight: balanced gives class c the weight n / (classes x n_c); none gives
    None, so the batches carry no weights at all (the cats-and-dogs recipe as it was shipped)."""
    if how == "none":
        return None
    counts = np.bincount(labels, minlength=classes).astype("float64")
    return (len(labels) / (classes * np.maximum(counts, 1)))[labels].astype("float32")


def resize(images, size):
    """A batch at another side length, the same way for training and validation batches."""
    import tensorflow as tf

    images = tf.cast(images, "float32")
    if isinstance(size, int) and images.shape[1] == size:
        return images
    return tf.image.resize(images, (size, size), antialias=True)


# --- 2. batches ------------------------------------------------------------------
def augment(images, seed, strength=1.0, part=(0, 1)):
    """Each image of a batch warped once by a random mirror, rotation, zoom and shift (AUGMENTATION,
    rotation, zoom and shift times `strength`),
    drawn from `seed` (two integers), so a resumed run draws what the interrupted one would have.
    One resampling per image: Keras's RandomRotation, RandomTranslation and RandomZoom resample
    once each, which made augmentation 4x slower and the images blurrier. part (process i of n): the
    images are process i's share of a batch, and get that share of the whole batch's draws."""
    import tensorflow as tf

    a = AUGMENTATION
    n, side = tf.shape(images)[0], tf.cast(tf.shape(images)[1], "float32")
    seeds = tf.random.experimental.stateless_split(seed, 5)
    i, parts = part

    def uniform(k, limit):
        if parts == 1:  # one process: the graph as it was (a slice changes its float rounding by 1e-4 of 255)
            return tf.random.stateless_uniform([n], seeds[k], -limit, limit)
        return tf.random.stateless_uniform([n * parts], seeds[k], -limit, limit)[i * n : (i + 1) * n]

    angle, zoom = uniform(0, a["rotation"] * strength * 2 * np.pi), 1 + uniform(1, a["zoom"] * strength)
    shift_x = uniform(2, a["translation"] * strength) * side
    shift_y = uniform(3, a["translation"] * strength) * side
    mirror = tf.sign(uniform(4, 1.0)) if a["horizontal_flip"] else tf.ones([n])
    transform = warp_transforms(angle, zoom, shift_x, shift_y, mirror, side, tf)
    # the op Keras's affine_transform runs on TensorFlow, called directly: keras.ops inside tf.data fails on
    # the JAX and PyTorch backends (keras-team/keras#21785), plain TensorFlow ops do not
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=tf.cast(transform, "float32"),
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode=a["fill_mode"].upper(),
    )


def warp_transforms(angle, zoom, shift_x, shift_y, mirror, side, xp):
    """Each image's warp as the 8 numbers ImageProjectiveTransformV3 takes (output pixel (x, y) reads the
    input at (t0 x + t1 y + t2, t3 x + t4 y + t5)), computed by xp (tensorflow or numpy) for both engines:
    the input at M (p - c) + c + shift, with M = zoom * rotation * mirror and c the image's centre."""
    c, cos, sin = (side - 1) / 2, xp.cos(angle) * zoom, xp.sin(angle) * zoom
    m00, m01, m10, m11 = cos * mirror, -sin, sin * mirror, cos
    zeros = xp.zeros_like(angle)
    return xp.stack(
        [m00, m01, c - c * (m00 + m01) + shift_x, m10, m11, c - c * (m10 + m11) + shift_y, zeros, zeros], axis=1
    )


def cutmix(images, y, w, seed, share):
    """CutMix (Yun et al., 2019) on a share of the batches: a random box of each image is replaced by the same
    box of another image of the batch, and targets and weights are mixed by the area of the box (drawn
    uniformly: Beta(1, 1)). The network must then use the whole picture, not the one part that gives the
    class away, which keeps a small training split from being learned by heart."""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, 5)
    n, h, wd = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    cut = tf.sqrt(tf.random.stateless_uniform([], s[0]))  # side of the box / side of the image
    bh, bw = tf.cast(cut * tf.cast(h, "float32"), "int32"), tf.cast(cut * tf.cast(wd, "float32"), "int32")
    cy = tf.random.stateless_uniform([], s[1], 0, h, dtype="int32")
    cx = tf.random.stateless_uniform([], s[2], 0, wd, dtype="int32")
    rows, cols = tf.range(h), tf.range(wd)
    inside_rows = (rows >= cy - bh // 2) & (rows < cy + bh - bh // 2)
    inside_cols = (cols >= cx - bw // 2) & (cols < cx + bw - bw // 2)
    mask = tf.cast(inside_rows[:, None] & inside_cols[None, :], "float32")[:, :, None]
    mask *= tf.cast(tf.random.stateless_uniform([], s[3]) < share, "float32")  # this batch, or not
    area = tf.reduce_mean(mask)
    other = tf.argsort(tf.random.stateless_uniform([n], s[4]))
    images = images * (1 - mask) + tf.gather(images, other) * mask
    y = (1 - area) * y + area * tf.gather(y, other)
    return (images, y) if w is None else (images, y, (1 - area) * w + area * tf.gather(w, other))


def batch_plan(count, batch_size, seed, sizes, first_epoch, part=(0, 1)):
    """(index, side, number): every batch's image indices (a row each), image size and number in the run
    (what its random draws are seeded with), from first_epoch on. Each epoch is a fresh shuffle drawn from
    (seed, epoch), so a resumed run draws the same batches; the ragged last batch of an epoch is dropped.
    part (process i of n): process i's share of each batch (its columns of index)."""
    steps = count // batch_size
    order = [np.random.default_rng([seed, e]).permutation(count)[: steps * batch_size] for e in range(len(sizes))]
    index = np.concatenate(order[first_epoch:]).reshape(-1, batch_size)
    side = np.repeat(np.array(sizes[first_epoch:], dtype="int32"), steps)
    i, n = part
    share = batch_size // n
    return index[:, i * share : (i + 1) * share], side, np.arange(first_epoch * steps, len(sizes) * steps)


def warped_batches(x, y, w, batch_size, seed, sizes, first_epoch, strength, mix=0.0, part=(0, 1)):
    """tf.data batches (images, targets[, weights]) for epochs first_epoch.. (one epoch after the other,
    each at its size), augmented on the fly by `augment`, and by `cutmix` on a share `mix` of them
    (part: batch_plan's, for --processes)."""
    import tensorflow as tf

    index, side, number = batch_plan(len(y), batch_size, seed, sizes, first_epoch, part)
    seeds = np.stack([np.full_like(number, seed), number], axis=1)  # each batch's own (seed, batch number)
    y = tf.convert_to_tensor(y)
    w = None if w is None else tf.convert_to_tensor(w)
    if isinstance(x, DiskImages):  # streamed: each batch read from the cache file

        def gather(i):
            images = tf.numpy_function(lambda i: x[i], [i], tf.uint8)
            images.set_shape([None, *x.shape[1:]])
            return images

    else:
        x = tf.convert_to_tensor(x)  # one copy in TensorFlow

        def gather(i):
            return tf.gather(x, i)

    def batch(i, s, k):
        images = augment(resize(gather(i), s), k, strength, part)
        if not mix:
            return (images, tf.gather(y, i)) if w is None else (images, tf.gather(y, i), tf.gather(w, i))
        weights = None if w is None else tf.gather(w, i)
        return cutmix(images, tf.gather(y, i), weights, tf.random.experimental.stateless_fold_in(k, 1), mix)

    epochs = tf.data.Dataset.from_tensor_slices((index, side, seeds)).map(batch, num_parallel_calls=2)
    return epochs.prefetch(2)


# The NumPy engine: the same batches without TensorFlow (for the JAX backend where TensorFlow is not installed).
# Same plan, same warps and CutMix, drawn by NumPy instead of TensorFlow's random ops, so the images differ
# from the tf.data engine's while following the same distributions.
def resize_array(images, size):
    """resize without TensorFlow: PIL's bilinear filter, widened when shrinking as TensorFlow's antialiased
    resize is (the two differ by rounding: at most 1 of 255 on real photos), as float32."""
    if images.shape[1] == size:
        return images.astype("float32")
    return np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.BILINEAR)) for i in images]).astype(
        "float32"
    )


def random_transforms(rng, n, side, strength=1.0, part=(0, 1)):
    """augment's draws (mirror, rotation, zoom, shift) for n images from a NumPy generator, as transforms
    (part: as augment's)."""
    a = AUGMENTATION
    i, parts = part

    def uniform(limit):
        return rng.uniform(-limit, limit, n * parts)[i * n : (i + 1) * n].astype("float32")

    angle, zoom = uniform(a["rotation"] * strength * 2 * np.pi), 1 + uniform(a["zoom"] * strength)
    shift_x, shift_y = uniform(a["translation"] * strength) * side, uniform(a["translation"] * strength) * side
    mirror = np.sign(uniform(1.0)) if a["horizontal_flip"] else np.ones(n, "float32")
    return warp_transforms(angle, zoom, shift_x, shift_y, mirror, np.float32(side), np).astype("float32")


def warp_arrays(images, transforms):
    """ImageProjectiveTransformV3 in NumPy, for the warps augment makes (bilinear, fill mode nearest: a point
    outside the image reads its nearest edge): N images x H x W x C and N x 8 transforms -> float32."""
    n, h, w, c = images.shape
    t = np.asarray(transforms, "float32")[:, :, None]
    gy, gx = (g.ravel()[None] for g in np.mgrid[0:h, 0:w].astype("float32"))
    x = np.clip(t[:, 0] * gx + t[:, 1] * gy + t[:, 2], 0, w - 1)  # N x HW input columns, clamped to the edge
    y = np.clip(t[:, 3] * gx + t[:, 4] * gy + t[:, 5], 0, h - 1)
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = x0.astype(np.intp), y0.astype(np.intp)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    pixels, base = images.reshape(n * h * w, c), (np.arange(n) * (h * w))[:, None]

    def at(row, col):
        return pixels[base + row * w + col].astype("float32")

    top = (1 - fx) * at(y0, x0) + fx * at(y0, x1)
    bottom = (1 - fx) * at(y1, x0) + fx * at(y1, x1)
    return ((1 - fy) * top + fy * bottom).reshape(n, h, w, c)


def cutmix_arrays(images, y, w, rng, share):
    """cutmix in NumPy: one box of each image replaced by the same box of another on a share of the batches."""
    n, h, wd = images.shape[:3]
    cut = np.sqrt(rng.uniform())
    bh, bw = int(cut * h), int(cut * wd)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, wd))
    mix = rng.uniform() < share
    other = rng.permutation(n)
    if not mix or not bh or not bw:
        return (images, y) if w is None else (images, y, w)
    rows = slice(max(cy - bh // 2, 0), min(cy + bh - bh // 2, h))
    cols = slice(max(cx - bw // 2, 0), min(cx + bw - bw // 2, wd))
    area = (rows.stop - rows.start) * (cols.stop - cols.start) / (h * wd)
    images = images.copy()
    images[:, rows, cols] = images[other, rows, cols]
    y = (1 - area) * y + area * y[other]
    return (images, y) if w is None else (images, y, ((1 - area) * w + area * w[other]).astype("float32"))


def array_batches(x, y, w, batch_size, seed, sizes, first_epoch, strength, mix=0.0, workers=2, part=(0, 1)):
    """warped_batches as a keras.utils.PyDataset with NumPy and PIL doing the work (threads: both release the
    GIL), for the JAX backend without TensorFlow: the same plan of batches and sizes, each batch's warps and
    CutMix drawn from (seed, batch number). Item k is batch k of the run (from first_epoch on), and the dataset
    is endless to Keras, which then keeps one iterator across epochs: Keras restarts a finite PyDataset's
    workers at item 0 each epoch and calls on_epoch_end once more than there are epochs, which would replay or
    shift batches. So Keras's own workers stay off and `workers` threads prepare the next batches instead."""
    keras = import_keras()
    index, side, number = batch_plan(len(y), batch_size, seed, sizes, first_epoch, part)

    def make(k):
        k %= len(index)  # Keras reads a batch or two past the last step; they are never trained on
        i, rng = index[k], np.random.default_rng([seed, int(number[k])])
        images = resize_array(x[i], int(side[k]))
        images = warp_arrays(images, random_transforms(rng, len(i), side[k], strength, part))
        if not mix:
            return (images, y[i]) if w is None else (images, y[i], w[i])
        return cutmix_arrays(images, y[i], None if w is None else w[i], rng, mix)

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1)  # no Keras enqueuer
            self.pool, self.ready = ThreadPoolExecutor(workers), {}

        @property
        def num_batches(self):
            return None  # endless: see above

        def __getitem__(self, k):
            for j in range(k, min(k + workers + 1, len(index))):  # this batch and the next ones, under way
                if j not in self.ready:
                    self.ready[j] = self.pool.submit(make, j)
            for j in [j for j in self.ready if j < k]:  # left behind when Keras started over at item 0
                del self.ready[j]
            return (self.ready.pop(k, None) or self.pool.submit(make, k)).result()

    return Batches()


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
        horizontal_flip=a["horizontal_flip"],
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


# --- 3. model ----------------------------------------------------------------------
def widths(multiplier):
    """Filters of the four blocks: utils.WIDTHS times --width."""
    return tuple(max(8, round(w * multiplier)) for w in WIDTHS)


def backend():
    """The Keras backend this run uses (KERAS_BACKEND, else Keras's own configuration), read without
    starting TensorFlow's devices (training_strategy may still split the CPU)."""
    choose_backend()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_stderr():
        import keras

    return keras.backend.backend()


def jax_strategy(devices, processes=1, process_id=0, coordinator=None):
    """(None, the devices' names) for --devices on the JAX backend: several devices train data-parallel through
    keras.distribution.DataParallel, set for the whole run: GPUs, or without them the CPU's devices, which
    main makes with XLA_FLAGS --xla_force_host_platform_device_count before JAX starts. With --processes, first
    joins the other processes (jax.distributed, which waits for all of them), then trains on the devices of
    all; each process feeds its own share of every batch (so Keras must not shard the batches again)."""
    keras = import_keras()
    if processes > 1:
        print(f"process {process_id} of {processes}: waiting for the others at {coordinator}", flush=True)
        try:
            keras.distribution.initialize(job_addresses=coordinator, num_processes=processes, process_id=process_id)
        except Exception as e:  # an address that does not resolve, a port in use, a process that never came
            raise UserError(f"--coordinator {coordinator}: the processes could not meet ({e})") from None
    import jax

    local = jax.local_devices()
    gpus = [d for d in local if d.platform != "cpu"]
    available = gpus or local
    n = devices or max(len(gpus), 1)
    if n > len(available):
        raise UserError(
            f"--devices {n}: JAX sees {len(available)} device(s) here (a CPU shows {n} with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}, set before JAX starts)"
        )
    # the first n devices of each process (every process is started alike)
    used = [d for p in range(processes) for d in [d for d in jax.devices() if d.process_index == p][:n]]
    if len(used) > 1:
        parallel = keras.distribution.DataParallel(devices=used, auto_shard_dataset=processes == 1)
        keras.distribution.set_distribution(parallel)
    return None, [str(d) for d in used]


def training_strategy(devices, processes=1, process_id=0, coordinator=None):
    """(tf.distribute strategy, the devices' names) for --devices: None for one device; several GPUs, or
    several logical devices of the one CPU (which TensorFlow must be told before it starts its devices).
    On the JAX backend: jax_strategy."""
    if backend() == "jax":
        return jax_strategy(devices, processes, process_id, coordinator)
    with quiet_stderr():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    n = devices or max(len(gpus), 1)
    if gpus and n > len(gpus):
        raise UserError(f"--devices {n}: this machine has {len(gpus)} GPU(s)")
    if n == 1:
        return None, ["/gpu:0" if gpus else "/cpu:0"]
    if gpus:
        names = [f"/gpu:{i}" for i in range(n)]
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        names = [f"/cpu:{i}" for i in range(n)]
    with quiet_stderr():
        return tf.distribute.MirroredStrategy(names), names


def compile_model(args, steps, class_names):
    """The trainable model (any image size), compiled with the schedule, loss and averaging."""
    keras = import_keras()
    warmup = min(args.warmup_steps, max(1, (args.epochs - 1) * steps))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0,
        decay_steps=max(1, args.epochs * steps - warmup),
        warmup_target=args.learning_rate,
        warmup_steps=warmup,
    )
    size = args.image_size if args.engine == "idg" else None  # the others train at several sizes
    model = build_model(size, class_names, widths=widths(args.width), bn_momentum=args.bn_momentum)
    if len(class_names) == 2:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=args.label_smoothing)
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing)
    model.compile(
        optimizer=keras.optimizers.RMSprop(schedule, use_ema=args.ema > 0, ema_momentum=args.ema or 0.99),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=backend() != "tensorflow",  # TensorFlow: XLA was slower on CPU here; JAX: always XLA
    )
    return model


# --- 4. fit: callbacks ---------------------------------------------------------------
def read_log(path):
    """Epoch rows of the CSV log, each epoch once (a row written twice around a crash counts once)."""
    if not path.exists():
        return []
    rows = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            rows[int(row["epoch"])] = {k: float(v) for k, v in row.items() if v not in ("", None)}
    return [rows[e] for e in sorted(rows)]


@contextlib.contextmanager
def averaged_weights(model):
    """A context in which the model holds the moving average of its weights (if the optimizer keeps one)."""
    if not model.optimizer.use_ema:
        yield
        return
    swap = import_keras().callbacks.SwapEMAWeights()
    swap.set_model(model)
    swap.on_test_begin()  # puts the averages into the model
    try:
        yield
    finally:
        swap.on_test_end()  # and the trained weights back


def accuracy(prob, labels):
    """Share of rows of prob (N x classes) whose most probable class is the label."""
    return float(np.mean(np.argmax(prob, axis=1) == labels))


def log_loss(prob, labels, eps=1e-7):
    return float(-np.mean(np.log(prob[np.arange(len(labels)), labels] + eps)))


def per_class(prob, labels, class_names):
    """Precision, recall and F1 of each class on the test split, and their macro averages (unweighted)."""
    pred = np.argmax(prob, axis=1)
    rows = {}
    for c, name in enumerate(class_names):
        tp = int(np.sum((pred == c) & (labels == c)))
        predicted, actual = int(np.sum(pred == c)), int(np.sum(labels == c))
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows[name] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "images": actual,
        }
    macro = {k: round(float(np.mean([r[k] for r in rows.values()])), 4) for k in ("precision", "recall", "f1")}
    return rows, macro


def batched(model):
    """run(images) -> the model's outputs, 256 images a call (what utils.class_probabilities calls)."""
    return lambda images: np.concatenate(
        [np.asarray(model(images[i : i + 256], training=False)) for i in range(0, len(images), 256)]
    )


def training_callbacks(args, model, work, sizes, x_val, y_val, offset):
    """Validation, best-epoch keeping, the log and the backup, in the order kill -9 needs."""
    keras = import_keras()
    val_at = {}
    weights_bytes = state_bytes(model)

    class Validate(keras.callbacks.Callback):
        """Validation accuracy and loss of the averaged weights, at the epoch's image size,
        with and without the mirror-image average (val_accuracy is what utils.MIRROR_TTA chooses)."""

        def on_epoch_end(self, epoch, logs):
            size = sizes[epoch]
            if size not in val_at and isinstance(x_val, np.ndarray):  # in memory: resized once per size
                val_at[size] = resizer(args.engine)(x_val, size) if size != x_val.shape[1] else x_val
            with averaged_weights(model):  # both kinds logged: one pass each
                plain, both = evaluate(model, val_at.get(size, x_val), size, args.engine)
            chosen = both if MIRROR_TTA else plain  # what utils.class_probabilities gives
            logs.update(
                val_accuracy=accuracy(chosen, y_val),
                val_loss=log_loss(chosen, y_val),
                val_accuracy_plain=accuracy(plain, y_val),
                val_accuracy_mirror=accuracy(both, y_val),
                image_size=size,
                elapsed_seconds=round(offset + time.perf_counter() - PROCESS_START),
                learning_rate=float(model.optimizer.learning_rate),  # where the schedule is after this epoch
            )

    class KeepBest(keras.callbacks.Callback):
        """Saves the averaged weights of each epoch that improves validation accuracy as
        best-NNN.weights.h5, and removes older ones once the log no longer points at them."""

        def __init__(self, best):
            super().__init__()
            self.best = best

        def on_epoch_end(self, epoch, logs):
            if logs["val_accuracy"] > self.best:
                self.best = logs["val_accuracy"]
                with averaged_weights(model):
                    atomic_write(
                        work / f"best-{epoch + 1:03d}.weights.h5", model.save_weights, need=weights_bytes, staged=True
                    )
                keep = {f"best-{epoch + 1:03d}.weights.h5", best_file(work).name}
                for old in work.glob("best-*.weights.h5"):
                    if old.name not in keep:
                        old.unlink()

    previous = read_log(work / "log.csv")
    callbacks = [
        # Keras prints "Epoch N/M" only when M > 1; a 1-epoch run gets the same line from here.
        keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: print("Epoch 1/1", flush=True) if args.epochs == 1 else None
        ),
        Validate(),
        # Order matters for kill -9: an epoch is logged only after its best weights are whole, and a
        # logged epoch whose backup is missing is simply trained again (read_log keeps it once).
        KeepBest(max((r["val_accuracy"] for r in previous), default=-1.0)),
        keras.callbacks.CSVLogger(str(work / "log.csv"), append=True),
        backup_class(state_bytes(model))(str(work / "backup"), delete_checkpoint=False),
    ]
    if args.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(args.out / "logs")))
    return callbacks


def best_file(work):
    """The weights file of the logged epoch with the best validation accuracy."""
    log = read_log(work / "log.csv")
    if not log:
        return work / "best-000.weights.h5"
    best = max(range(len(log)), key=lambda i: (log[i]["val_accuracy"], -i))
    return work / f"best-{int(log[best]['epoch']) + 1:03d}.weights.h5"


def state_bytes(model):
    """Bytes of a weights file with the optimizer's state (RMSprop's averages and the EMA) beside the weights."""
    return 4 * model.count_params() * 4 + 1_000_000


def backup_class(need):
    keras = import_keras()

    class AtomicBackup(keras.callbacks.BackupAndRestore):
        """Keras's BackupAndRestore, but each file is replaced by a rename, so kill -9 while it
        saves leaves the previous backup rather than half a file (which Keras cannot load)."""

        def _save_model(self):
            atomic_write(
                self._weights_path, lambda tmp: self.model.save_weights(tmp, overwrite=True), need=need, staged=True
            )
            # metadata after weights: it never claims an epoch the weights do not have
            write_json(self._training_metadata_path, {"epoch": self._current_epoch, "batch": self._last_batch_seen})

    return AtomicBackup


def forget_unbacked_epochs(log, first):
    """Drop log rows of epochs that the backup does not hold: a resumed run trains them again."""
    if log.exists():
        lines = log.read_text().splitlines(keepends=True)
        kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) < first]
        if kept != lines:
            atomic_write(log, lambda tmp: Path(tmp).write_text("".join(kept)))


def finished_epochs(work):
    """Epochs the backup holds (where a resumed fit starts)."""
    meta = work / "backup" / "training_metadata.json"
    return json.loads(meta.read_text())["epoch"] if meta.exists() else 0


# --- the run ---------------------------------------------------------------------------
def read_split(data):
    """(class names, [(paths, labels) of train, val, test]) of the split prepare_data.py wrote."""
    if not data.is_dir():
        raise UserError(f"{data} does not exist; run `python prepare_data.py` first")
    names, folders = split_classes(data)
    if len(names) < 2:
        raise UserError(
            f"{data / 'train'} has {len(names)} class folder(s); it needs two or more: run "
            f"`python prepare_data.py --out {data}` first"
        )
    return names, [list_split(data, split, folders) for split in ("train", "val", "test")]


def resolve_recipe(args, train_images):
    """Fill the flags left unset with `recipe`'s values for this split; return the names of those derived."""
    derived = []
    for key, value in recipe(train_images, args.batch_size, args.epochs).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            derived.append(key)
    if args.engine == "idg" and "cutmix" in derived:
        args.cutmix = 0.0  # ImageDataGenerator's batches are not mixed
    return derived


def main(argv=None):
    choose_backend()
    args = parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if (args.devices or 1) > 1 and os.environ.get("KERAS_BACKEND") == "jax" and "device_count" not in flags:
        # JAX shows a CPU as several devices only when told before it starts (GPUs are not affected)
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
    if args.export:
        try:
            return export_step(args.export)
        except UserError as e:
            fail(str(e))
    # Ctrl-C must reach us even when started from a shell that ignores it (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out, work = args.out, args.out / ".run"  # .run holds the unfinished run's backup and log
    try:
        class_names, splits = read_split(args.data)
        derived = resolve_recipe(args, len(splits[0][0]))
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in RESUMABLE}
        if args.resume:
            if not (work / "config.json").exists():
                raise UserError(f"nothing to resume in {out}; run without --resume to start training")
            saved = json.loads((work / "config.json").read_text())
            diff = [
                f"--{k.replace('_', '-')} {saved.get(k)} (now {config[k]})" for k in config if saved.get(k) != config[k]
            ]
            if diff:
                raise UserError(f"--resume needs the flags of the interrupted run: {', '.join(diff)}")
        with exclusive(out / ".lock", f"--out {out}"):
            return train(args, out, work, config, derived, class_names, splits)
    except Exception as e:
        if not isinstance(e, UserError) and not is_disk_full(e):
            raise
        message = str(e) if isinstance(e, UserError) else str(DiskFull(out, 0))
        if isinstance(e, DiskFull) or is_disk_full(e):
            flags = " ".join(sys.argv[1:]).replace("--resume", "").strip()
            if read_log(work / "log.csv"):
                message += f"; then continue with: python train.py {flags} --resume".replace("  ", " ")
        fail(message)
    except KeyboardInterrupt:
        done = len(read_log(work / "log.csv"))
        flags = " ".join(sys.argv[1:]).replace("--resume", "").strip()
        if not (work / "config.json").exists():  # stopped while loading: there is nothing to resume yet
            fail(f"interrupted before training began; start again with: python train.py {flags}".strip(), code=130)
        fail(
            f"interrupted after {done} finished epoch(s) of {args.epochs}; "
            f"continue with: python train.py {flags} --resume".replace("  ", " "),
            code=130,
        )


def train(args, out, work, config, derived, class_names, splits):
    started = time.perf_counter()

    # 1. data: each split (listed by read_split) into memory, or, when that does not fit (or --stream),
    # decoded once into a cache on disk that each batch is read from; first, before TensorFlow or JAX
    # start their thread pools (load_images forks its workers)
    in_memory = check_memory([len(paths) for paths, _ in splits], args.image_size, args.batch_size, args.stream)
    if in_memory:
        loaded = [load_split(*split, args.image_size) for split in splits]
    else:
        print(f"streaming the splits from {args.data / '.cache'} (--stream, or they do not fit in memory)")
        loaded = [
            cache_split(*split, args.image_size, args.data, name) for split, name in zip(splits, SPLITS, strict=True)
        ]
    (x_train, y_train, _), (x_val, y_val, _), (x_test, y_test, test_paths) = loaded
    if len(x_train) < args.batch_size:
        raise UserError(
            f"{args.data}/train has {len(x_train)} images, fewer than --batch-size {args.batch_size}; "
            "lower --batch-size or prepare more images"
        )
    print(
        f"loaded train {len(x_train)}, val {len(x_val)}, test {len(x_test)} images of {len(class_names)} classes "
        f"at {args.image_size}px in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    print(
        "recipe: " + ", ".join(f"{k} {getattr(args, k)}" + (" (derived)" if k in derived else "") for k in RECIPE),
        flush=True,
    )
    # TensorFlow must not have started its devices yet, nor JAX met the other processes
    strategy, devices = training_strategy(args.devices, args.processes, args.process_id, args.coordinator)

    keras = import_keras()
    keras.utils.set_random_seed(args.seed)
    gpus = gpu_facts()
    precision = args.precision if args.precision != "auto" else choose_precision(gpus, cpu_has_bf16())
    keras.mixed_precision.set_global_policy(precision)
    # 2. model, batches
    sizes = image_sizes(args.image_size, args.epochs, args.progressive)
    steps = len(x_train) // args.batch_size
    with strategy.scope() if strategy else contextlib.nullcontext():  # variables on every device
        model = compile_model(args, steps, class_names)
    # what the run will write, before an hour of training: the backup and its previous copy, at most two
    # best-epoch files, the model and its LiteRT copy
    check_space(out, 4 * state_bytes(model) + 2 * 4 * model.count_params())
    if not args.resume:  # only now that data and disk are good: a refused run leaves an unfinished one alone
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    write_json(work / "config.json", config)
    first = finished_epochs(work)
    forget_unbacked_epochs(work / "log.csv", first)
    y_fit = targets(y_train, len(class_names))
    w_fit = sample_weights(y_train, len(class_names), args.class_weights)
    first_epoch, part = min(first, args.epochs - 1), (args.process_id, args.processes)
    if args.engine == "layers":
        batches = warped_batches(
            x_train, y_fit, w_fit, args.batch_size, args.seed, sizes, first_epoch, args.augment, args.cutmix, part
        )
    elif args.engine == "numpy":
        batches = array_batches(
            x_train,
            y_fit,
            w_fit,
            args.batch_size,
            args.seed,
            sizes,
            first_epoch,
            args.augment,
            args.cutmix,
            workers=args.workers,
            part=part,
        )
    else:
        batches = idg_batches(x_train, y_fit, w_fit, args.batch_size, args.seed, args.workers, args.augment)
    print(f"precision {precision}; devices {', '.join(devices)}; image size by epoch {sizes}", flush=True)

    # 4. fit; elapsed_seconds count from this process's start, plus what earlier runs of a resumed one took
    previous = read_log(work / "log.csv")
    offset = previous[-1]["elapsed_seconds"] if previous else 0.0
    model.fit(
        batches,
        epochs=args.epochs,
        steps_per_epoch=steps,
        shuffle=False,  # the batches are shuffled per epoch already
        callbacks=training_callbacks(args, model, work, sizes, x_val, y_val, offset),
        verbose=1 if sys.stdout.isatty() else 2,
    )  # a progress bar on a terminal, a line per epoch in logs

    # 4. evaluate: the best epoch's averaged weights, in float32 at the final size, on the test split
    log = read_log(work / "log.csv")
    model.load_weights(best_file(work))
    keras.mixed_precision.set_global_policy("float32")
    final = build_model(args.image_size, class_names, widths=widths(args.width))
    final.set_weights(model.get_weights())
    plain, both = evaluate(final, x_test)
    prob = both if MIRROR_TTA else plain  # what utils.class_probabilities, and so predict.py, gives
    device = ", ".join(f"{name} (compute capability {'.'.join(map(str, cc or ('?',)))})" for name, cc in gpus) or "cpu"
    device += f"; data-parallel on {len(devices)}: {', '.join(devices)}" if len(devices) > 1 else ""
    history = metrics_of(
        args, log, prob, plain, y_test, final, precision, len(x_train), len(x_val), class_names, device
    )

    # 5. save, each file whole or not at all
    predictions = [
        {
            "path": str(p),
            "true": class_names[t],
            "predicted": class_names[int(np.argmax(q))],
            "probabilities": {name: round(float(v), 4) for name, v in zip(class_names, q, strict=True)},
        }
        for p, t, q in zip(test_paths, y_test, prob, strict=True)
    ]
    keras_file, litert_file = model_files(class_names)

    atomic_write(out / keras_file, final.save, need=4 * final.count_params())
    if backend() == "tensorflow":
        atomic_write(
            out / litert_file, lambda tmp: export_litert(final, tmp), need=8 * final.count_params(), staged=True
        )
    elif args.process_id or not export_in_tensorflow(out / keras_file):  # process 0 writes the run's .tflite
        litert_file = None
    atomic_write(out / LABELS_FILE, lambda tmp: Path(tmp).write_bytes(labels_bytes(class_names)))
    write_json(out / "history.json", history["history"])
    write_json(out / "test_predictions.json", predictions)
    write_json(out / "metrics.json", history["metrics"])
    shutil.rmtree(work, ignore_errors=True)
    m = history["metrics"]
    print(
        f"test accuracy {m['test_accuracy']:.4f} on {len(y_test)} images (best epoch {m['best_epoch']}, "
        f"val {m['best_val_accuracy']:.4f}; macro F1 {m['macro_f1']:.4f}); {m['train_seconds']:.0f} s from start "
        f"to last epoch; saved {out / keras_file}" + (f" and {out / litert_file}" if litert_file else "")
    )
    return m


def export_litert(model, path):
    """The model as a LiteRT (.tflite) file with built-in ops only, for predict.py without TensorFlow: two
    outputs, the model's and its classes' heat maps (utils.explaining_model), and the class names packed
    inside as labels.txt."""
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its SavedModel's signature
        try:
            model = explaining_model(model)
        except ValueError:  # not train.py's network (tests make such files): no heat maps to add
            pass
        model.export(path, format="litert", verbose=False)
    names = names_of_keras_model(model)
    if names:
        pack_labels(path, names)


def export_in_tensorflow(keras_path):
    """The .tflite beside a .keras written on another backend: LiteRT's converter needs TensorFlow, so
    `train.py --export` runs it in a process of its own on the TensorFlow backend. False when it could not."""
    if has_tensorflow():
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        command = [sys.executable, str(Path(__file__).resolve()), "--export", str(keras_path)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        why = (result.stderr.splitlines() or ["?"])[-1] if result.returncode else None
    else:
        why = "TensorFlow, which LiteRT's converter needs, is not installed here"
    if why:
        print(
            f"note: {keras_path} is saved, its LiteRT copy is not ({why}); predict.py reads the .keras, or write the "
            f".tflite where TensorFlow is installed: KERAS_BACKEND=tensorflow python train.py --export {keras_path}",
            file=sys.stderr,
        )
    return not why


def export_step(keras_path):
    """train.py --export: the .tflite of a saved .keras model, written beside it."""
    keras = import_keras()
    class_names_layer()  # registers the layer that carries the names
    if not keras_path.is_file() or keras_path.suffix.lower() != ".keras":
        raise UserError(f"--export takes a .keras model file from train.py; {keras_path} is not one")
    try:
        model = keras.models.load_model(keras_path, compile=False)
        explaining_model(model)
    except Exception as e:  # a user's file can fail to load in many ways
        raise UserError(f"{keras_path} is not a model from train.py ({type(e).__name__}: {e})") from None
    litert = keras_path.with_suffix(".tflite")
    atomic_write(litert, lambda tmp: export_litert(model, tmp), need=8 * model.count_params(), staged=True)
    print(f"wrote {litert}")


def metrics_of(args, log, prob, plain, y_test, final, precision, train_images, val_images, class_names, device):
    """history.json (per epoch) and metrics.json (the saved model on the test split)."""
    keys = [
        "accuracy",
        "val_accuracy",
        "loss",
        "val_loss",
        "val_accuracy_plain",
        "val_accuracy_mirror",
        "image_size",
        "learning_rate",
        "elapsed_seconds",
    ]
    history = {k: [r[k] for r in log if k in r] for k in keys}
    history = {k: v for k, v in history.items() if v}
    best_epoch = int(np.argmax(history["val_accuracy"]))
    reached = [r["elapsed_seconds"] for r in log if r["val_accuracy"] >= 0.9]
    classes, macro = per_class(prob, y_test, class_names)
    metrics = {
        "classes": list(class_names),
        "test_accuracy": round(accuracy(prob, y_test), 4),
        "test_accuracy_plain": round(accuracy(plain, y_test), 4),
        "test_loss": round(log_loss(prob, y_test), 4),
        "test_images": len(y_test),
        "macro_precision": macro["precision"],
        "macro_recall": macro["recall"],
        "macro_f1": macro["f1"],
        "per_class": classes,
        "train_images": train_images,
        "val_images": val_images,
        "best_epoch": best_epoch + 1,
        "best_val_accuracy": round(history["val_accuracy"][best_epoch], 4),
        "epochs": len(log),
        "seconds_to_90_val": reached[0] if reached else None,
        "train_seconds": log[-1]["elapsed_seconds"],  # wall time from process start, data loading included
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "recipe": {k: getattr(args, k) for k in RECIPE},
        "parameters": final.count_params(),
        "precision": precision,
        "engine": args.engine,
        "device": device,
        "cpu": cpu_model(),
    }
    return {"history": history, "metrics": metrics}


if __name__ == "__main__":
    main()
