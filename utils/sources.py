"""A source of photos read in place: a folder, a zip, or a URL downloaded once; its classes found among
whatever else it holds; each file hashed and decoded with a reason for every one dropped."""

import hashlib
import io
import zipfile
from pathlib import Path, PurePosixPath

from utils.backend import import_keras
from utils.config import DOWNLOAD_DIR, IMAGE_EXTENSIONS, MAX_FILE_BYTES, MICROSOFT_CLASSES
from utils.files import UserError
from utils.images import BadImage, open_image


def fetch(url):
    """Download url once into data/downloads with Keras's cached, resumable get_file."""
    keras = import_keras()  # imported here: only a download needs TensorFlow

    name = url.rstrip("/").split("/")[-1] or "dataset.zip"
    folder = DOWNLOAD_DIR.resolve()
    folder.mkdir(parents=True, exist_ok=True)  # get_file falls back to /tmp when the folder is missing
    try:
        path = Path(keras.utils.get_file(name, origin=url, cache_dir=str(folder.parent), cache_subdir=folder.name))
    except Exception as e:  # get_file raises bare Exceptions for network errors
        raise UserError(
            f"could not download {url} ({str(e).splitlines()[0]}); "
            "download the zip yourself and pass --source path/to/kagglecatsanddogs_5340.zip"
        ) from None
    if not zipfile.is_zipfile(path):  # a download killed mid-way leaves the start of the file
        raise UserError(f"{path}, downloaded from {url}, is not a whole zip; delete it and run again")
    return path


def layout(paths, source):
    """Classes of a source from its file paths (relative, POSIX): [(name, folder in the split)] in label
    order, and for each path its label, or None for a file outside the class folders.

    Only files named as images decide the layout; anything else (a licence, a readme, Thumbs.db) never
    makes a class or hides one. Folders that hold the images of only one sub-folder (PetImages/, flowers/,
    data/) are looked through, at any depth. Then each sub-folder holding images is a class, its images
    found recursively below it; its name is the class name, in sorted order. Cat/ and Dog/ (any case) alone
    are the Microsoft archive: classes cat and dog in folders cats/ and dogs/."""
    parts = [PurePosixPath(p).parts for p in paths]
    images = [p for p in parts if is_image(p[-1])]
    if not images:
        raise UserError(
            f"no images found in {source} (files ending in {', '.join(IMAGE_EXTENSIONS)}); "
            "expected one sub-folder of images per class"
        )
    root = ()  # the folder whose sub-folders are the classes
    while True:
        below = [p[len(root) :] for p in images]
        folders = sorted({q[0] for q in below if len(q) > 1})
        loose = ["/".join(root + q) for q in below if len(q) == 1]
        if loose or len(folders) != 1:
            break
        root += (folders[0],)
    if loose and folders:
        raise UserError(
            f"{len(loose)} image(s) of {source} lie loose beside the class folders "
            f"{', '.join(f + '/' for f in folders)} (such as {loose[0]}); put every image in the folder of its class"
        )
    if loose:
        found = f"only the class folder {'/'.join(root)}/ (all its images are in it)" if root else "no class folders"
        raise UserError(
            f"{source} has {found}; it needs two or more sub-folders, one per class, "
            "with the images of that class inside (as the Microsoft archive's PetImages/Cat and PetImages/Dog)"
        )
    if {f.lower() for f in folders} == set(MICROSOFT_CLASSES) and len(folders) == 2:
        folders.sort(key=str.lower)
        classes = [MICROSOFT_CLASSES[f.lower()][::-1] for f in folders]
    else:
        classes = [(f, f) for f in folders]
    index = {f: i for i, f in enumerate(folders)}
    n = len(root)
    return classes, [index[q[n]] if len(q) > n + 1 and q[:n] == root and q[n] in index else None for q in parts]


def is_image(name):
    return PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS


def hidden(parts):
    """Why a file is no one's data, or None: macOS's resource forks (__MACOSX/), and hidden files and
    folders (.DS_Store, .ipynb_checkpoints/)."""
    if "__MACOSX" in parts:
        return "macOS resource fork (__MACOSX)"
    if any(p.startswith(".") for p in parts):
        return "hidden"
    return None


def read_source(source):
    """(classes, files, skipped): the classes [(name, folder)] in label order; (relative path, label, reader)
    for every file below a class folder of the source; and {"path", "reason"} for every other file."""
    if "://" in str(source):
        source = fetch(str(source))
    source = Path(source)
    if not source.exists():
        raise UserError(
            f"--source {source} does not exist; pass the Microsoft zip, or a folder or zip with one sub-folder "
            "of images per class"
        )
    if source.is_dir():
        found = [(p.relative_to(source).as_posix(), p) for p in sorted(source.rglob("*")) if p.is_file()]
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            names = sorted(i.filename for i in zf.infolist() if not i.is_dir())
        found = [(name, (source, name)) for name in names]
    else:
        raise UserError(f"--source {source} is neither a zip file nor a folder")
    reasons = [hidden(PurePosixPath(rel).parts) for rel, _ in found]
    skipped = [{"path": rel, "reason": why} for (rel, _), why in zip(found, reasons, strict=True) if why]
    found = [entry for entry, why in zip(found, reasons, strict=True) if not why]
    if not found:
        raise UserError(f"no files found in {source}; expected one sub-folder of images per class")
    classes, labels = layout([rel for rel, _ in found], source)
    files, outside = [], []
    for (rel, where), label in zip(found, labels, strict=True):
        if label is None:
            outside.append({"path": rel, "reason": "not in a class folder"})
        else:
            files.append((rel, label, where))
    skipped += outside
    return classes, files, sorted(skipped, key=lambda s: s["path"])


_zips = {}  # zip files open in this process: one handle per worker


class TooLarge(Exception):
    """A source file above MAX_FILE_BYTES: no photo is that big, a zip bomb is."""


def open_source(where):
    """A binary stream of one source file, refused up front when its stated size is over the limit."""
    if isinstance(where, Path):
        if where.stat().st_size > MAX_FILE_BYTES:
            raise TooLarge
        return open(where, "rb")
    zip_path, member = where
    if zip_path not in _zips:
        _zips[zip_path] = zipfile.ZipFile(zip_path)
    if _zips[zip_path].getinfo(member).file_size > MAX_FILE_BYTES:  # the zip header's size
        raise TooLarge
    return _zips[zip_path].open(member)


def read_chunks(where, size=1 << 20):
    """The file's bytes in chunks; TooLarge as soon as more than MAX_FILE_BYTES were read
    (a header can lie), so memory stays flat whatever the source holds."""
    total = 0
    with open_source(where) as f:
        while chunk := f.read(size):
            total += len(chunk)
            if total > MAX_FILE_BYTES:
                raise TooLarge
            yield chunk


def read_bytes(where):
    return b"".join(read_chunks(where))


TOO_LARGE = f"larger than {MAX_FILE_BYTES // 2**20} MB (no photo is; a zip bomb is)"


def hash_file(where):
    """SHA-256 of the file, hashed while streaming; or None for a file to drop, with the reason."""
    digest, size = hashlib.sha256(), 0
    try:
        for chunk in read_chunks(where):
            digest.update(chunk)
            size += len(chunk)
    except TooLarge:
        return None, TOO_LARGE
    except (OSError, zipfile.BadZipFile, EOFError) as e:  # a damaged member (bad CRC, cut short)
        return None, f"unreadable ({e})"
    if size == 0:  # two empty files are no picture filed twice (the archive has one in Cat/, one in Dog/)
        return None, "empty file"
    return digest.hexdigest(), None


def find_duplicates(files, digests):
    """Return {path: reason} for every copy to drop: later copies, and pictures in both classes."""
    first, labels = {}, {}
    for (path, label, _), digest in zip(files, digests, strict=True):
        if digest is None:
            continue
        first.setdefault(digest, path)
        labels.setdefault(digest, set()).add(label)
    drop = {}
    for (path, _, _), digest in zip(files, digests, strict=True):
        if digest is None:
            continue
        if len(labels[digest]) > 1:
            drop[path] = f"same picture in {len(labels[digest])} classes"
        elif first[digest] != path:
            drop[path] = f"duplicate of {first[digest]}"
    return drop


def clean(task):
    """Decode one file; return (jpeg bytes, None) or (None, reason)."""
    where, max_side = task
    try:
        img = open_image(read_bytes(where))
    except BadImage as e:
        return None, str(e)
    except TooLarge:
        return None, TOO_LARGE
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return None, f"unreadable ({e})"
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=92)
    return buf.getvalue(), None
