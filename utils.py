"""Shared pieces of catsdogs: names, defaults, image loading and the model.

Every script imports its facts from here, so training and prediction can never
disagree on class names, image size or preprocessing.
"""

import io
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# --- facts -----------------------------------------------------------------
CLASS_NAMES = ("cats", "dogs")  # folder names of a split; label index = position
LABELS = ("cat", "dog")  # what predict.py prints for label 0 and 1
SOURCE_CLASSES = {"cat": 0, "dog": 1}  # folder names in the Microsoft archive
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 64  # pixels per side fed to the network (train.py --image-size)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

DATA_DIR = Path("data/processed")
CACHE_DIR = Path("data")  # downloads go to data/downloads
MODEL_DIR = Path("models")
MODEL_FILE = "cats_vs_dogs.keras"
MICROSOFT_URL = (
    "https://download.microsoft.com/download/3/E/1/3E1C3F21-ECDB-4869-8368-6DEBA77B919F/kagglecatsanddogs_5340.zip"
)

# A picture of more pixels than this is refused, not decoded (decompression bombs);
# 10,000 x 10,000 photos still pass, and JPEGs that large decode at reduced scale.
MAX_PIXELS = 120_000_000
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


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


# --- files -----------------------------------------------------------------
def atomic_write(path, write):
    """Call write(tmp_path) and rename the result onto path, so path is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)  # keep ".weights.h5" whole: Keras checks file endings
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def save_image_grid(images, titles, title, path, cols=4):
    """Draw images (arrays or PIL images) in a titled grid and save it as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display
    import matplotlib.pyplot as plt

    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image)
        ax.set_title(text, fontsize=11)
    fig.suptitle(title, fontsize=14)
    save_figure(fig, path, dpi=72)  # photos compress poorly: keep the PNG small


def fail(message, code=2):
    """Print one line for a user mistake and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def import_keras():
    """Import Keras (on TensorFlow) without TensorFlow's start-up chatter on stderr.

    TensorFlow's C++ start-up (CUDA probing, CPU feature notes) writes to the stderr
    file descriptor before its log settings apply, so stderr is parked while it starts.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras
        import tensorflow as tf

        tf.config.list_logical_devices()  # device start-up happens here, while muted
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return keras


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


# --- model -----------------------------------------------------------------
def build_model(image_size=IMAGE_SIZE, widths=(16, 32, 64, 128), dropout=0.3):
    """The CNN: Conv/BatchNorm/ReLU/MaxPool blocks, global average pooling, dropout, sigmoid.

    The first block has one 3x3 convolution, the others two; global average
    pooling replaces the baseline's 9.5M-parameter Flatten/Dense (0.29M parameters in all).
    """
    keras = import_keras()
    layers = keras.layers

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255)(inputs)
    for i, width in enumerate(widths):
        for _ in range(1 if i == 0 else 2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
        x = layers.MaxPooling2D()(x)
        x = layers.Dropout(dropout / 3)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    outputs = layers.Dense(1, activation="sigmoid", name="dog_probability")(x)
    return keras.Model(inputs, outputs, name="cats_vs_dogs")
