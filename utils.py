"""Shared pieces of catsdogs: names, defaults, image loading and the model.

Every script imports its facts from here, so training and prediction can never
disagree on class names, image size or preprocessing.
"""

import contextlib
import errno
import functools
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# --- facts -----------------------------------------------------------------
# The Microsoft archive's class folders (any case) -> (folder in the split, the class's name). Any other
# source's classes are its sub-folders' names; prepare_data.py writes them to report.json, train.py reads
# them from there and puts them inside both model files, and predict.py reads them from the model.
MICROSOFT_CLASSES = {"cat": ("cats", "cat"), "dog": ("dogs", "dog")}
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 160  # pixels per side of the finished model (train.py --image-size)
WIDTHS = (32, 64, 128, 256)  # filters of the network's four blocks (train.py --width scales them)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

DATA_DIR = Path("data/processed")
CACHE_DIR = Path("data")  # downloads go to data/downloads
MODEL_DIR = Path("models")
MODEL_FILE = "cats_vs_dogs.keras"
LITERT_FILE = "cats_vs_dogs.tflite"  # the same model for LiteRT: predict.py without TensorFlow
OTHER_MODEL_STEM = "model"  # model.keras and model.tflite: the files of any class set other than cat, dog
LABELS_FILE = "labels.txt"  # class names, one a line in output order: beside the models, and inside the .tflite
MICROSOFT_URL = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip"
)

# A picture of more pixels than this is refused, not decoded (decompression bombs);
# 10,000 x 10,000 photos still pass, and JPEGs that large decode at reduced scale.
MAX_PIXELS = 120_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# A source file larger than this is dropped unread (no real photo comes near; a zip bomb does),
# so reading a hostile archive never needs more memory than this per worker.
MAX_FILE_BYTES = 64 * 2**20


class UserError(Exception):
    """A mistake the user can fix; scripts print it as one line and exit."""


class BadImage(UserError):
    """A file that is not a whole, decodable image."""


# --- images ----------------------------------------------------------------
def open_image(source):
    """Decode a path or bytes fully into an upright RGB PIL image, or raise BadImage.

    Handles every format PIL reads whatever the file is called, EXIF rotation,
    grayscale/CMYK/palette/alpha, and refuses truncated files and bombs.
    """
    try:
        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise BadImage("empty file")
            source = io.BytesIO(source)
        elif os.path.getsize(source) == 0:
            raise BadImage("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.draft("RGB", (1024, 1024))  # JPEG: decode huge photos at reduced scale
                img.load()
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                    rgba = img.convert("RGBA")
                    img = Image.new("RGB", rgba.size, (255, 255, 255))
                    img.paste(rgba, mask=rgba.getchannel("A"))
                return img.convert("RGB")
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("decompression bomb") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        text = str(e).lower()
        raise BadImage("truncated" if "truncat" in text else f"unreadable ({e})") from None


def load_image(source, size=IMAGE_SIZE):
    """The one preprocessing of training and prediction: uint8 array (size, size, 3).

    Scaling to [0, 1] happens inside the model (its Rescaling layer).
    """
    img = open_image(source).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def list_images(folder):
    """Image files below folder, recursively, sorted, by extension (any case)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def split_classes(data):
    """(class names, folder names) of a split in label order: as prepare_data.py wrote them to report.json
    (the Microsoft data's folders cats/ and dogs/ hold the classes cat and dog), or, for a split made by
    hand, the sorted sub-folders of train/, each its own name."""
    data = Path(data)
    report = data / "report.json"
    if report.exists():
        try:
            classes = json.loads(report.read_text())["classes"]
            return [c["name"] for c in classes], [c["folder"] for c in classes]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise UserError(
                f"{report} has no class list (an older prepare_data.py wrote it); run prepare_data.py again"
            ) from None
    folders = sorted(p.name for p in (data / "train").iterdir() if p.is_dir()) if (data / "train").is_dir() else []
    return folders, folders


# --- files ---------------------------------------------------------------
class DiskFull(UserError):
    """A write that does not fit on the disk: the folder, and how much the step needed."""

    def __init__(self, folder, need, free=None):
        free = free_bytes(folder) if free is None else free
        super().__init__(
            f"the disk of {folder} is full: this step needs about {megabytes(need)} and {megabytes(free)} "
            "is free; free some space (or choose another folder) and run again"
        )


def megabytes(n):
    return f"{n / 1e3:,.0f} kB" if n < 1e6 else f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def free_bytes(folder):
    """Free bytes on the filesystem that holds folder (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_space(folder, need):
    """Raise DiskFull unless folder's disk has room for need bytes plus a small margin."""
    free = free_bytes(folder)
    need += 64_000 + need // 20
    if free < need:
        raise DiskFull(folder, need, free)


def is_disk_full(error):
    """ENOSPC or EDQUOT, also when a library (h5py) reports it only in its message."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "No space left" in text or "errno = 28" in text or "Disk quota exceeded" in text


def atomic_write(path, write, need=0, staged=False):
    """Call write(tmp_path) and rename the result onto path, so path is never half-written.

    need: bytes the file will take (0 if small or unknown), checked before writing. A disk that
    fills up while writing raises DiskFull, and the temporary file is removed.
    staged: write into memory (/dev/shm) first and copy from there: for writers that crash the
    interpreter when the disk fills under them (h5py), so only a plain copy meets the full disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if need:
        check_space(path.parent, need)
    suffix = "".join(path.suffixes)  # keep ".weights.h5" whole: Keras checks file endings
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        if staged:
            ram = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            with tempfile.TemporaryDirectory(dir=ram) as stage:
                write(os.path.join(stage, path.name))
                shutil.copyfile(os.path.join(stage, path.name), tmp)
        else:
            write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except Exception as e:
        if not is_disk_full(e):
            raise
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        os.remove(tmp)
        raise DiskFull(path.parent, max(need, written + free_bytes(path.parent))) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def exclusive(lock_file, what):
    """Hold lock_file for the duration of the block, or refuse when another process holds it.

    The kernel releases the lock when its process ends, however it ends, so a killed run never
    blocks the next one (nor do its worker processes, which do not inherit the lock). The file is
    removed at the end; a process that opened it just before
    sees that its file is no longer the one at lock_file and tries again.
    """
    import fcntl

    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(lock_file, "a+")
        try:
            # a POSIX record lock: unlike flock, worker processes forked later do not share it, so a
            # killed run's orphaned workers cannot keep it
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise UserError(f"{what} is in use by another run (process {pid}); wait for it to end or stop it") from None
        try:
            if os.stat(lock_file).st_ino == os.fstat(f.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()  # removed by the run that just ended: lock the new file instead
    try:
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        os.unlink(lock_file)
        f.close()


def available_memory():
    """Bytes of memory a new allocation can get: MemAvailable, or a cgroup limit if lower."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available or 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def save_figure(fig, path, dpi=100):
    """Write a matplotlib figure to path as PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def save_image_grid(images, titles, title, path, cols=4, heat_legend=False):
    """Draw images (arrays or PIL images) in a titled grid and save it as PNG; heat_legend: the images carry
    heat maps (blend), so add a colour bar saying what their colours mean."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows + 0.6 * heat_legend), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image)
        ax.set_title(text, fontsize=11)
    fig.suptitle(title, fontsize=14)
    if heat_legend:
        mappable = matplotlib.cm.ScalarMappable(cmap=HEAT_COLORMAP)
        bar = fig.colorbar(mappable, ax=axes, orientation="horizontal", fraction=0.4 / (3.3 * rows + 0.6), pad=0.02)
        bar.set_ticks([0, 1], labels=["looked less", "looked most (Grad-CAM of the label)"])
    save_figure(fig, path, dpi=72)  # photos compress poorly: keep the PNG small


def fail(message, code=2):
    """Print one line for a user mistake and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def quiet_stderr():
    """Park the stderr file descriptor: native start-up chatter (TensorFlow's CUDA probing and CPU
    notes, LiteRT's delegate notice) is written there before any log setting applies."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def choose_backend():
    """Before Keras is imported: Keras's default backend is TensorFlow; where TensorFlow is not installed and
    KERAS_BACKEND is not set, use JAX (which trains and predicts with the same scripts), and say so once."""
    if "KERAS_BACKEND" in os.environ or has_tensorflow():
        return
    if not importlib.util.find_spec("jax"):
        fail("neither TensorFlow nor JAX is installed here, and Keras needs one: `pip install -r requirements.txt`")
    os.environ["KERAS_BACKEND"] = "jax"
    print("TensorFlow is not installed here: Keras runs on JAX (KERAS_BACKEND=jax)", file=sys.stderr, flush=True)


def import_keras():
    """Import Keras without TensorFlow's start-up chatter on stderr; TensorFlow itself only on its backend
    (on JAX, training needs no TensorFlow)."""
    choose_backend()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_stderr():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_logical_devices()  # device start-up happens here, while muted
    return keras


def has_tensorflow():
    """Whether TensorFlow is installed here (found, not imported)."""
    return importlib.util.find_spec("tensorflow") is not None


class Progress:
    """A one-line progress counter on stderr, for work that takes minutes."""

    def __init__(self, total, label):
        self.total, self.label, self.done, self.shown = total, label, 0, -1

    def update(self, n=1):
        self.done += n
        pct = 100 * self.done // max(self.total, 1)
        tty = sys.stderr.isatty()
        if pct != self.shown and (tty or pct % 10 == 0):  # logs get a line per 10%
            self.shown = pct
            end = "\n" if self.done >= self.total or not tty else ""
            print(f"\r{self.label}: {self.done}/{self.total} ({pct}%)", end=end, file=sys.stderr, flush=True)


# --- model ---------------------------------------------------------------
def model_files(class_names):
    """(keras file, tflite file) names for a class set: cats_vs_dogs.* for cat/dog, model.* for any other."""
    if tuple(class_names) == tuple(name for _, name in MICROSOFT_CLASSES.values()):
        return MODEL_FILE, LITERT_FILE
    return f"{OTHER_MODEL_STEM}.keras", f"{OTHER_MODEL_STEM}.tflite"


@functools.cache
def class_names_layer():
    """The Keras layer that carries a model's class names in its config: an identity on the output, so
    the names are saved in the .keras file's config.json, survive load and save, and cost nothing in the
    LiteRT copy. Registered under "catsdogs>ClassNames", which load_model finds once this has run."""
    keras = import_keras()

    @keras.saving.register_keras_serializable(package="catsdogs")
    class ClassNames(keras.layers.Layer):
        def __init__(self, names, **kwargs):
            super().__init__(**kwargs)
            self.names = [str(n) for n in names]

        def call(self, x):
            return x

        def compute_output_shape(self, shape):
            return shape

        def get_config(self):
            return {**super().get_config(), "names": self.names}

    return ClassNames


def names_of_keras_model(model):
    """Class names carried by a model built by build_model, or None."""
    cls = class_names_layer()
    layers = [layer for layer in model.layers if isinstance(layer, cls)]
    return layers[-1].names if layers else None


def labels_bytes(class_names):
    """labels.txt: one class name a line, in output order, UTF-8 (beside the models and inside the .tflite)."""
    return "".join(f"{name}\n" for name in class_names).encode("utf-8")


def read_labels(data):
    """The class names of labels.txt's bytes."""
    return data.decode("utf-8").splitlines()


def pack_labels(tflite_path, class_names):
    """Append labels.txt to a .tflite file as an associated file, the way LiteRT's metadata tools
    (Model Maker, Teachable Machine) pack them: a zip archive after the flatbuffer, which the
    interpreter ignores and any zip reader finds."""
    import zipfile

    with zipfile.ZipFile(tflite_path, "a") as zf:
        zf.writestr(LABELS_FILE, labels_bytes(class_names))


def unpack_labels(tflite_path):
    """The class names packed into a .tflite file (pack_labels), or None. No TensorFlow needed."""
    import zipfile

    try:
        with zipfile.ZipFile(tflite_path) as zf:
            return read_labels(zf.read(LABELS_FILE))
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, OSError):
        return None


def build_model(
    image_size=IMAGE_SIZE,
    class_names=("cat", "dog"),
    widths=WIDTHS,
    stem=32,
    dropout=0.3,
    block_dropout=0.1,
    bn_momentum=0.99,
):
    """The CNN: a strided Conv stem, then blocks of two Conv/BatchNorm/ReLU, MaxPool and Dropout,
    global average pooling, Dropout and the classifier: one sigmoid unit (the probability of the second
    class) for two classes, a softmax over N classes for more (1.18 M parameters by default). Its last
    layer, ClassNames, carries the names of the classes in output order.

    image_size None builds a fully convolutional model that takes any size (progressive resizing
    trains it so); the saved model is rebuilt at the final size, which predict.py reads from it.
    Layers are named, so weights move between the two builds by name. bn_momentum: how slowly
    BatchNormalization's statistics for inference follow the training batches (train.recipe derives it).
    """
    keras = import_keras()
    layers = keras.layers

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = layers.Conv2D(stem, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(momentum=bn_momentum, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for i, width in enumerate(widths, 1):
        for j in (1, 2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"block{i}_conv{j}")(x)
            x = layers.BatchNormalization(momentum=bn_momentum, name=f"block{i}_bn{j}")(x)
            x = layers.ReLU(name=f"block{i}_relu{j}")(x)
        x = layers.MaxPooling2D(name=f"block{i}_pool")(x)
        x = layers.Dropout(block_dropout, name=f"block{i}_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="average")(x)
    x = layers.Dropout(dropout, name="dropout")(x)
    n = len(class_names)
    if n < 2:
        raise ValueError(f"a classifier needs two or more classes, not {list(class_names)}")
    if n == 2:
        x = layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(x)
    else:
        x = layers.Dense(n, activation="softmax", dtype="float32", name="probabilities")(x)
    outputs = class_names_layer()(class_names, dtype="float32", name="class_names")(x)
    return keras.Model(inputs, outputs, name="classifier")


# Test-time augmentation: each prediction averages the photo and its mirror image.
# train.py reports validation accuracy with and without it (history.json: val_accuracy_mirror).
MIRROR_TTA = True


def as_class_probabilities(outputs):
    """A model's outputs as N x classes probabilities: one sigmoid unit p becomes (1 - p, p)."""
    outputs = np.asarray(outputs, dtype="float64").reshape(len(outputs), -1)
    return np.concatenate([1 - outputs, outputs], axis=1) if outputs.shape[1] == 1 else outputs


def plain_and_mirrored(run, images):
    """(plain, averaged) class probabilities (N x classes): run(batch) on the images, and averaged with
    their mirror images."""
    plain = as_class_probabilities(run(images))
    mirrored = as_class_probabilities(run(np.ascontiguousarray(images[:, :, ::-1])))
    return plain, (plain + mirrored) / 2


def class_probabilities(run, images):
    """The one prediction of evaluation and predict.py: run(batch) -> N x classes probabilities,
    averaged with the mirrored batch when MIRROR_TTA. images: uint8/float array N x H x W x 3."""
    if MIRROR_TTA:
        return plain_and_mirrored(run, images)[1]
    return as_class_probabilities(run(images))


def choose_precision(gpus, cpu_bf16):
    """The compute type of training for the devices at hand: gpus, a list of (name, compute capability as
    (major, minor) or None); cpu_bf16, whether the CPU computes bfloat16 natively (cpu_has_bf16).

    GPU from compute capability 7.0 (V100, T4, A100, H100): mixed_float16 (Keras scales the loss itself);
    older or unknown GPUs: float32 (TensorFlow runs many bfloat16 ops of a GPU on the CPU, tensorflow#58138);
    no GPU: mixed_bfloat16 where the CPU has it, float32 elsewhere (emulated bfloat16 is slower)."""
    if gpus:
        capabilities = [cc for _, cc in gpus]
        return "mixed_float16" if all(cc and tuple(cc) >= (7, 0) for cc in capabilities) else "float32"
    return "mixed_bfloat16" if cpu_bf16 else "float32"


def gpu_facts():
    """[(name, (major, minor) or None)] of the GPUs the Keras backend sees: TensorFlow's or JAX's."""
    keras = import_keras()
    facts = []
    if keras.backend.backend() == "jax":
        import jax

        for device in jax.devices():
            if device.platform == "gpu":
                cc = getattr(device, "compute_capability", None)
                facts.append((device.device_kind, tuple(int(v) for v in str(cc).split(".")[:2]) if cc else None))
        return facts
    import tensorflow as tf

    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        facts.append((details.get("device_name", device.name), details.get("compute_capability")))
    return facts


def cpu_has_bf16():
    """True when the CPU computes bfloat16 natively (AVX512_BF16 or AMX); elsewhere it is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def cpu_model():
    """The CPU's model name, for metrics.json: timings are only comparable on one machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


# --- explanations ----------------------------------------------------------
# Where the model looked: Grad-CAM (Selvaraju et al., 2017) over the first convolution of the last
# block, a 10 x 10 grid at 160 px. Grad-CAM weights each feature map by the spatial mean of the class
# score's gradient; here that mean is computed in closed form from the layers after the features
# (convolution, BatchNorm, ReLU, max pool, average, dense), so the same few matrix products run inside
# the .keras model and inside the LiteRT file, with no gradient code and no TensorFlow at prediction.
EXPLAIN_BLOCK = -1  # which block's first convolution (the last); README "Why did it say dog?" measures it


def explaining_model(model):
    """model (from build_model) with a second output, every class's Grad-CAM map: batch x h x w x outputs,
    the signed evidence for that output's score (one sigmoid unit: for the second class; the first's is
    its negative). Equals Grad-CAM by gradients (tests/test_explain.py checks it to 1e-4)."""
    keras = import_keras()
    ops = keras.ops
    blocks = [layer.name[: -len("_relu1")] for layer in model.layers if layer.name.endswith("_relu1")]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not blocks or not dense:
        raise ValueError(f"{model.name} is not a network of utils.build_model: it has no blocks to explain")
    block, dense = blocks[EXPLAIN_BLOCK], dense[-1]  # the classifier
    features = model.get_layer(f"{block}_relu1").output  # A: h x w x k, the maps that get explained
    activated = model.get_layer(f"{block}_relu2").output  # the second convolution's, after its ReLU
    pooled = model.get_layer(f"{block}_pool").output
    conv, bn = model.get_layer(f"{block}_conv2"), model.get_layer(f"{block}_bn2")
    scale = np.asarray(bn.gamma) / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)
    h, w, k = features.shape[1:]
    ph, pw = pooled.shape[1:3]
    # The score's gradient at the second convolution is dense / (ph pw) where a unit is the maximum of its
    # pool window and positive, 0 elsewhere. Back through the 3 x 3 convolution, its sum over all places
    # needs only, per tap of the kernel, how many such units the tap sees inside the map's border.
    taps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    kernel = np.asarray(conv.kernel, dtype="float64") * scale  # 3 x 3 x k(in) x k(out), BatchNorm folded in
    back = np.concatenate([kernel[dy + 1, dx + 1] for dy, dx in taps], axis=1) / (ph * pw * h * w)  # k x 9k
    back, head = back.astype("float32"), np.asarray(dense.kernel, dtype="float32")  # head: k x outputs

    def class_maps(tensors):
        a, r, p = tensors
        up = ops.repeat(ops.repeat(p, 2, axis=1), 2, axis=2)  # each unit's pool maximum
        r = r[:, : 2 * ph, : 2 * pw]  # an odd row or column is not pooled: it gets no gradient
        routed = ops.cast(ops.logical_and(ops.equal(r, up), ops.greater(r, 0.0)), "float32")
        routed = ops.pad(routed, [[0, 0], [0, h - 2 * ph], [0, w - 2 * pw], [0, 0]])
        seen = [
            ops.sum(routed[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)], axis=(1, 2))
            for dy, dx in taps
        ]
        seen = ops.concatenate(seen, axis=1)  # batch x 9k: units seen by each tap, per output channel
        seen = ops.reshape(seen, (-1, 9, k, 1)) * head[None, None]  # times each output's dense weight
        seen = ops.reshape(seen, (-1, 9 * k, head.shape[1]))
        alpha = ops.matmul(back, seen)  # batch x k x outputs: Grad-CAM's weights
        return ops.reshape(ops.matmul(ops.reshape(a, (-1, h * w, k)), alpha), (-1, h, w, head.shape[1]))

    maps = keras.layers.Lambda(class_maps, name="class_maps")([features, activated, pooled])
    return keras.Model(model.input, [model.output, maps], name="explained")


def as_class_maps(maps):
    """Explaining outputs as N x h x w x classes: one sigmoid unit's map m becomes (-m, m)."""
    maps = np.asarray(maps, dtype="float32")
    return np.concatenate([-maps, maps], axis=3) if maps.shape[3] == 1 else maps


def probabilities_and_maps(explain, images):
    """What class_probabilities gives, and each class's map (N x h x w x classes) averaged the same way:
    explain(batch) -> (outputs, maps) for the photos and their mirror images, whose maps are mirrored back."""
    outputs, maps = explain(images)
    probs, maps = as_class_probabilities(outputs), as_class_maps(maps)
    if MIRROR_TTA:
        outputs, mirrored = explain(np.ascontiguousarray(images[:, :, ::-1]))
        probs = (probs + as_class_probabilities(outputs)) / 2
        maps = (maps + as_class_maps(mirrored)[:, :, ::-1]) / 2
    return probs, maps


def heat_map(class_map, size):
    """One class's map (h x w) as a heat map of size x size in [0, 1]: its positive evidence (Grad-CAM's
    ReLU), upsampled bilinearly over the image and scaled so its peak is 1 (all 0 when there is none)."""
    heat = Image.fromarray(np.maximum(class_map, 0).astype(np.float32)).resize((size, size), Image.BILINEAR)
    heat = np.maximum(np.asarray(heat), 0)
    top = heat.max()
    return heat / top if top > 0 else heat


HEAT_COLORMAP = "inferno"  # perceptually uniform: black (the model did not look here) to yellow (it did)
HEAT_ALPHA = 0.55  # share of the colour in the blend; the photo keeps the rest


@functools.cache
def heat_palette():
    """HEAT_COLORMAP as a 256 x 3 uint8 lookup table (matplotlib's colour map, read once)."""
    try:
        from matplotlib import colormaps
    except ImportError:
        raise UserError("heat maps are drawn with matplotlib's colour maps: pip install matplotlib") from None

    return (colormaps[HEAT_COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def heat_colors(heat):
    """heat in [0, 1] (any shape) as uint8 RGB in HEAT_COLORMAP."""
    return heat_palette()[np.clip(np.asarray(heat) * 255 + 0.5, 0, 255).astype(np.uint8)]


def blend(image, heat):
    """A uint8 image with its heat map laid over it (same height and width): HEAT_ALPHA of colour, the rest photo."""
    alpha = round(HEAT_ALPHA * 256)
    mixed = np.asarray(image, dtype=np.uint16) * (256 - alpha) + heat_colors(heat).astype(np.uint16) * alpha
    return (mixed >> 8).astype(np.uint8)
