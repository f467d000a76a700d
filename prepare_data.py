"""Get, clean and split the Microsoft Cats and Dogs dataset, or any folder of classes.

    python prepare_data.py --source ../shared/data/PetImages-180px.zip
    python prepare_data.py --source ../shared/data/flowers-5-256px.zip --out data/flowers

1. Read the source (the Microsoft zip, downloaded once into data/; a local zip; or a folder):
   each sub-folder holding images is a class (images found recursively below it), its name the
   class name. Folders wrapping the classes are looked through; files that are not named as
   images, hidden files and __MACOSX/ never make a class, and report.json lists them as skipped.
2. Hash every file: byte-identical files are kept once, and a picture found
   under two classes is dropped from both.
3. Decode each file in parallel; whatever is not a whole image is dropped, the
   rest is written as an RGB JPEG (downscaled to --max-side).
4. Split each class with a seeded shuffle into train/val/test and move the
   finished folder into place in one rename, with report.json beside it.
"""

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import signal
import statistics
import sys
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

from utils import (
    CACHE_DIR,
    DATA_DIR,
    IMAGE_EXTENSIONS,
    MAX_FILE_BYTES,
    MICROSOFT_CLASSES,
    MICROSOFT_URL,
    SPLITS,
    BadImage,
    DiskFull,
    Progress,
    UserError,
    check_space,
    exclusive,
    fail,
    import_keras,
    is_disk_full,
    open_image,
    write_json,
)

REPORT_VERSION = 2  # 2: classes listed in the report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--source",
        default=MICROSOFT_URL,
        help="a folder or zip with one sub-folder of images per class (two or more; the folder's name is the "
        "class name), such as the Microsoft zip (PetImages/Cat, PetImages/Dog: classes cat and dog), "
        "or a URL of such a zip, downloaded once into data/downloads (default: Microsoft's URL)",
    )
    p.add_argument(
        "--out", type=Path, default=DATA_DIR, help="where train/, val/, test/ and report.json go (default: %(default)s)"
    )
    p.add_argument(
        "--seed", type=int, default=42, help="seed of the split; same seed, same split (default: %(default)s)"
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of each class for validation (default: %(default)s)"
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.1, help="share of each class for test (default: %(default)s)"
    )
    p.add_argument("--limit", type=int, default=None, help="keep at most N clean images per class, for quick runs")
    p.add_argument(
        "--max-side",
        type=int,
        default=180,
        help="downscale images whose longer side exceeds this many pixels, so training "
        "never decodes large JPEGs (default: %(default)s)",
    )
    p.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="decoding processes (default: all cores, %(default)s)"
    )
    p.add_argument("--force", action="store_true", help="rebuild even if --out already holds this exact split")
    args = p.parse_args(argv)
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1 and args.val_fraction + args.test_fraction < 1):
        p.error("--val-fraction and --test-fraction must be in [0, 1) and sum to less than 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


# --- 1. read the source ----------------------------------------------------
def fetch(url):
    """Download url once into data/downloads with Keras's cached, resumable get_file."""
    keras = import_keras()  # imported here: only a download needs TensorFlow

    name = url.rstrip("/").split("/")[-1] or "dataset.zip"
    cache = CACHE_DIR.resolve()
    cache.mkdir(parents=True, exist_ok=True)  # get_file falls back to /tmp when the folder is missing
    try:
        path = Path(keras.utils.get_file(name, origin=url, cache_dir=str(cache), cache_subdir="downloads"))
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
        found = f"all in one folder, {'/'.join(root)}/: one class only" if root else "loose, in no folder"
        raise UserError(
            f"the images of {source} are {found}; it needs two or more sub-folders, one per class, "
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
    skipped = [{"path": rel, "reason": why} for rel, _ in found if (why := hidden(PurePosixPath(rel).parts))]
    found = [(rel, where) for rel, where in found if not hidden(PurePosixPath(rel).parts)]
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


_zips = {}


class TooLarge(Exception):
    """A source file above MAX_FILE_BYTES: no photo is that big, a zip bomb is."""


def open_source(where):
    """A binary stream of one source file, refused up front when its stated size is over the limit."""
    if isinstance(where, Path):
        if where.stat().st_size > MAX_FILE_BYTES:
            raise TooLarge
        return open(where, "rb")
    zip_path, member = where
    if zip_path not in _zips:  # one open handle per worker process
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


# --- 2. duplicates -----------------------------------------------------------
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


# --- 3. decode ---------------------------------------------------------------
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


# --- 4. split ----------------------------------------------------------------
def split_counts(n, val_fraction, test_fraction):
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def output_name(path, taken):
    stem = PurePosixPath(path).stem
    name = f"{stem}.jpg"
    if name in taken:  # e.g. 1.jpg and 1.png in the same class
        name = f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}.jpg"
    taken.add(name)
    return name


def estimated_output(files, args):
    """A low estimate of the bytes the split will take, from the source's sizes: refuse at the start
    when even that does not fit, rather than after decoding everything."""
    sizes, zips = [], {}  # not the workers' _zips: a handle opened before the fork would be shared
    for _, _, where in files:
        if isinstance(where, Path):
            sizes.append(where.stat().st_size)
        else:
            zip_path, member = where
            if zip_path not in zips:
                zips[zip_path] = zipfile.ZipFile(zip_path)
            sizes.append(zips[zip_path].getinfo(member).file_size)
    sizes = [min(s, MAX_FILE_BYTES) for s in sizes]
    # re-encoded at most --max-side pixels a side: a quality-92 JPEG takes about half a byte a pixel
    per_file = min(statistics.median(sizes), args.max_side**2 // 2) if sizes else 0
    n = len(files) if args.limit is None else min(len(files), 2 * args.limit)
    return int(n * per_file / 2)  # half of it: refuse only what clearly will not fit


def prepare(args):
    source_desc = str(args.source)
    config = {
        "version": REPORT_VERSION,
        "source": source_desc,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "limit": args.limit,
        "max_side": args.max_side,
    }
    classes, files, skipped = read_source(args.source)
    config["source_files"] = len(files)
    if "://" not in source_desc:
        st = Path(source_desc).stat()
        config["source_stamp"] = [st.st_size, int(st.st_mtime)]
    report_path = args.out / "report.json"
    if not args.force and report_path.exists():
        try:
            if json.loads(report_path.read_text()).get("config") == config:
                print(
                    f"{args.out} already holds this split (same source and settings); nothing to do. "
                    "Pass --force to rebuild it."
                )
                return json.loads(report_path.read_text())
        except json.JSONDecodeError:
            pass

    check_space(args.out.parent, estimated_output(files, args))
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        progress = Progress(len(files), "hashing")
        digests, dropped = [], []
        for (path, _, _), (digest, reason) in zip(
            files, pool.map(hash_file, [w for _, _, w in files], chunksize=64), strict=True
        ):
            digests.append(digest)
            if reason:
                dropped.append({"path": path, "reason": reason})
            progress.update()
        dropped += [{"path": p, "reason": r} for p, r in find_duplicates(files, digests).items()]
        skip = {d["path"] for d in dropped}

        # Candidates per class in seeded order; decode in that order until --limit are kept.
        rng = random.Random(args.seed)
        kept = {label: [] for label in range(len(classes))}
        for label, (_, folder) in enumerate(classes):
            todo = [(p, w) for p, lab, w in files if lab == label and p not in skip]
            rng.shuffle(todo)
            want = len(todo) if args.limit is None else min(args.limit, len(todo))
            progress = Progress(want, f"decoding {folder}")
            step = max(64, 8 * args.workers)
            for start in range(0, len(todo), step):
                if len(kept[label]) >= want:
                    break
                batch = todo[start : start + step]
                for (path, _), (jpeg, reason) in zip(
                    batch, pool.map(clean, [(w, args.max_side) for _, w in batch], chunksize=8), strict=True
                ):
                    if len(kept[label]) >= want:
                        break
                    if jpeg is None:
                        dropped.append({"path": path, "reason": reason})
                    else:
                        kept[label].append((path, jpeg))
                        progress.update()

    check_every_split_gets_one(classes, kept, args)
    # Write everything into a temporary sibling folder, then swap it into place.
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    # each file takes whole blocks on disk: count 4 kB more per file
    check_space(args.out.parent, sum(len(jpeg) + 4096 for items in kept.values() for _, jpeg in items))
    try:
        report = write_split(args, classes, kept, dropped, skipped, config, tmp, started)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half a split filling the disk
        if is_disk_full(e):
            raise DiskFull(args.out.parent, sum(len(j) for items in kept.values() for _, j in items)) from None
        raise
    old = args.out.with_name(f".{args.out.name}.old-{os.getpid()}")
    if args.out.exists():
        os.rename(args.out, old)
    os.rename(tmp, args.out)
    shutil.rmtree(old, ignore_errors=True)
    print_table(report)
    return report


def check_every_split_gets_one(classes, kept, args):
    """Refuse a class too small to give each split (with a fraction above 0) at least one image."""
    for label, (name, _) in enumerate(classes):
        counts = split_counts(len(kept[label]), args.val_fraction, args.test_fraction)
        fractions = {"train": 1, "val": args.val_fraction, "test": args.test_fraction}
        empty = [s for s in SPLITS if fractions[s] > 0 and counts[s] == 0]
        if empty:
            n = len(kept[label])
            raise UserError(
                f"class {name!r} has {n} usable image(s), too few to put one in each of train, val and test "
                f"(it gets none in {', '.join(empty)}); add images to it, or remove its folder"
            )


def write_split(args, classes, kept, dropped, skipped, config, tmp, started):
    """The split's files and report.json, in tmp."""
    splits = {s: {folder: 0 for _, folder in classes} for s in SPLITS}
    for label, items in kept.items():
        cls = classes[label][1]
        counts = split_counts(len(items), args.val_fraction, args.test_fraction)
        taken, i = set(), 0
        for split in SPLITS:
            folder = tmp / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for path, jpeg in items[i : i + counts[split]]:
                (folder / output_name(path, taken)).write_bytes(jpeg)
            i += counts[split]
            splits[split][cls] = counts[split]
    report = {
        "config": config,
        "classes": [
            {"name": name, "folder": folder, "images": sum(splits[s][folder] for s in SPLITS)}
            for name, folder in classes
        ],
        "splits": splits,
        "kept": sum(len(v) for v in kept.values()),
        "dropped": sorted(dropped, key=lambda d: d["path"]),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(tmp / "report.json", report)
    return report


def print_table(report):
    reasons = {}
    for d in report["dropped"]:
        key = "duplicate" if d["reason"].startswith("duplicate of") else d["reason"]
        reasons[key] = reasons.get(key, 0) + 1
    print(f"\nkept {report['kept']} images, dropped {len(report['dropped'])} in {report['seconds']} s")
    for reason, n in sorted(reasons.items()):
        print(f"  dropped {n:6d}  {reason}")
    for reason in sorted({s["reason"] for s in report["skipped"]}):
        n = sum(s["reason"] == reason for s in report["skipped"])
        print(f"  skipped {n:6d}  {reason}")
    width = max(len("class"), *(len(c["folder"]) for c in report["classes"]))
    print(f"\n{'class':<{width}}" + "".join(f"{s:>8}" for s in SPLITS))
    for c in report["classes"]:
        print(f"{c['folder']:<{width}}" + "".join(f"{report['splits'][s][c['folder']]:>8}" for s in SPLITS))


def recover(out):
    """Tidy up after a run that was killed: half-built splits go, and a previous split
    caught between its two renames is put back."""
    if not out.parent.exists():
        return
    for stale in sorted(out.parent.glob(f".{out.name}.*-*")):
        if ".old-" in stale.name and not out.exists():
            os.rename(stale, out)
        else:
            shutil.rmtree(stale, ignore_errors=True)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started as a background job
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(args.out.with_name(f".{args.out.name}.lock"), f"--out {args.out}"):
            recover(args.out)
            prepare(args)
    except UserError as e:
        fail(str(e))
    except OSError as e:
        if not is_disk_full(e):
            raise
        fail(str(DiskFull(args.out.parent, 0)))
    except KeyboardInterrupt:
        fail(f"interrupted; {args.out} is unchanged", code=130)


if __name__ == "__main__":
    sys.exit(main())
