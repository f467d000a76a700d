"""Images and splits: the one decoder of every script, the splits loaded into memory or streamed from disk."""

import contextlib
import hashlib
import io
import json
import mmap
import os
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from utils.config import IMAGE_EXTENSIONS, IMAGE_SIZE, MAX_PIXELS, SPLITS
from utils.files import BadImage, Progress, UserError, atomic_write, available_memory, megabytes

Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # larger pictures raise DecompressionBombError: open_image refuses them


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


def load_images(paths, size):
    """The images decoded at size (load_image) into one uint8 array N x size x size x 3.

    On Linux, one forked process per core decodes every k-th image into memory shared with this one
    (threads would hold one GIL for much of PIL's work, and a process pool would send the pixels back).
    Call it before TensorFlow or JAX start their threads, which fork does not copy. A worker that fails
    leaves its images to this process, which decodes them itself, so a bad file raises here, naming it."""
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


def load_splits(data, splits, size, batch_size, stream=False):
    """Each split of read_split as (images, int labels, paths) at size: in memory, or, when that does not fit
    beside a training step of batch_size (or stream), decoded once into DATA/.cache and read from there by
    batch (DiskImages). Call it before TensorFlow or JAX start their thread pools: load_images forks."""
    if check_memory([len(paths) for paths, _ in splits], size, batch_size, stream):
        return [load_split(*split, size) for split in splits]
    print(f"streaming the splits from {data / '.cache'} (--stream, or they do not fit in memory)")
    return [cache_split(*split, size, data, name) for split, name in zip(splits, SPLITS, strict=True)]


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
