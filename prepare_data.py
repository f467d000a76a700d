"""Get, clean and split the Microsoft Cats and Dogs dataset, or any folder of classes.

    python prepare_data.py --source ../shared/data/PetImages-180px.zip
    python prepare_data.py --source ../shared/data/flowers-5-256px.zip --out data/flowers

1. Read the source (the Microsoft zip, downloaded once into data/downloads; a local zip; or a folder):
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

from utils.config import DATA_DIR, MAX_FILE_BYTES, MICROSOFT_URL, SPLITS
from utils.files import DiskFull, Progress, UserError, check_space, exclusive, exit_with, fail, is_disk_full, write_json
from utils.sources import clean, find_duplicates, hash_file, read_source

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


def prepare(args):
    # 1. read the source: its classes, the files below them, and what else it holds
    classes, files, skipped = read_source(args.source)
    config = split_config(args, len(files))
    if not args.force and (done := existing_split(args.out, config)):
        return done
    check_space(args.out.parent, estimated_output(files, args.limit, args.max_side))
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers, initializer=exit_with, initargs=(os.getpid(),)) as pool:
        # 2. duplicates: later copies, and pictures found under two classes
        dropped = deduplicate(pool, files)
        # 3. decode each class's files in a seeded order until --limit are kept
        kept = decode(pool, classes, files, dropped, args.seed, args.limit, args.max_side, args.workers)
    check_every_split_gets_one(classes, kept, args.val_fraction, args.test_fraction)
    # 4. split and write, into a temporary sibling folder that is then swapped into place
    report = write_in_place(args, classes, kept, dropped, skipped, config, started)
    print_table(report)
    return report


def split_config(args, source_files):
    """What makes a split what it is: the source (and its size and time, for a file), the settings."""
    config = {
        "version": REPORT_VERSION,
        "source": str(args.source),
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "limit": args.limit,
        "max_side": args.max_side,
        "source_files": source_files,
    }
    if "://" not in str(args.source):
        st = Path(args.source).stat()
        config["source_stamp"] = [st.st_size, int(st.st_mtime)]
    return config


def existing_split(out, config):
    """The report of the split already in out when it was made from config, else None."""
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if report.get("config") != config:
        return None
    print(f"{out} already holds this split (same source and settings); nothing to do. Pass --force to rebuild it.")
    return report


def estimated_output(files, limit, max_side):
    """A low estimate of the bytes the split will take, from the source's sizes: refuse at the start
    when even that does not fit, rather than after decoding everything."""
    sizes, zips = [], {}  # not the workers' open zips: a handle opened before the fork would be shared
    for _, _, where in files:
        if isinstance(where, Path):
            sizes.append(where.stat().st_size)
        else:
            zip_path, member = where
            if zip_path not in zips:
                zips[zip_path] = zipfile.ZipFile(zip_path)
            sizes.append(zips[zip_path].getinfo(member).file_size)
    sizes = [min(s, MAX_FILE_BYTES) for s in sizes]
    # re-encoded at most max_side pixels a side: a quality-92 JPEG takes about half a byte a pixel
    per_file = min(statistics.median(sizes), max_side**2 // 2) if sizes else 0
    n = len(files) if limit is None else min(len(files), 2 * limit)
    return int(n * per_file / 2)  # half of it: refuse only what clearly will not fit


def deduplicate(pool, files):
    """Hash every file in the pool: [{"path", "reason"}] of those dropped, unreadable or duplicates."""
    progress = Progress(len(files), "hashing")
    digests, dropped = [], []
    hashed = pool.map(hash_file, [w for _, _, w in files], chunksize=64)
    for (path, _, _), (digest, reason) in zip(files, hashed, strict=True):
        digests.append(digest)
        if reason:
            dropped.append({"path": path, "reason": reason})
        progress.update()
    return dropped + [{"path": p, "reason": r} for p, r in find_duplicates(files, digests).items()]


def decode(pool, classes, files, dropped, seed, limit, max_side, workers):
    """{label: [(path, jpeg bytes)]}: each class's files not dropped yet, in an order shuffled by seed,
    decoded in the pool until limit of them are kept; the files that fail are added to dropped."""
    rng = random.Random(seed)
    skip = {d["path"] for d in dropped}
    kept = {label: [] for label in range(len(classes))}
    for label, (_, folder) in enumerate(classes):
        todo = [(p, w) for p, lab, w in files if lab == label and p not in skip]
        rng.shuffle(todo)
        want = len(todo) if limit is None else min(limit, len(todo))
        progress = Progress(want, f"decoding {folder}")
        step = max(64, 8 * workers)
        for start in range(0, len(todo), step):
            if len(kept[label]) >= want:
                break
            batch = todo[start : start + step]
            cleaned = pool.map(clean, [(w, max_side) for _, w in batch], chunksize=8)
            for (path, _), (jpeg, reason) in zip(batch, cleaned, strict=True):
                if len(kept[label]) >= want:
                    break
                if jpeg is None:
                    dropped.append({"path": path, "reason": reason})
                else:
                    kept[label].append((path, jpeg))
                    progress.update()
    return kept


def check_every_split_gets_one(classes, kept, val_fraction, test_fraction):
    """Refuse a class too small to give each split (with a fraction above 0) at least one image."""
    fractions = {"train": 1, "val": val_fraction, "test": test_fraction}
    for label, (name, _) in enumerate(classes):
        counts = split_counts(len(kept[label]), val_fraction, test_fraction)
        empty = [s for s in SPLITS if fractions[s] > 0 and counts[s] == 0]
        if empty:
            n = len(kept[label])
            raise UserError(
                f"class {name!r} has {n} usable image(s), too few to put one in each of train, val and test "
                f"(it gets none in {', '.join(empty)}); add images to it, or remove its folder"
            )


def split_counts(n, val_fraction, test_fraction):
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def write_in_place(args, classes, kept, dropped, skipped, config, started):
    """The split written whole into a temporary sibling of --out, then renamed into place; a previous
    split is replaced only then, and a failed write leaves nothing behind."""
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
    return report


def output_name(path, taken):
    stem = PurePosixPath(path).stem
    name = f"{stem}.jpg"
    if name in taken:  # e.g. 1.jpg and 1.png in the same class
        name = f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}.jpg"
    taken.add(name)
    return name


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
