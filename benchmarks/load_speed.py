"""Decoding a split into memory: utils.images.load_images (forked workers) against threads, on one machine.

    python benchmarks/load_speed.py                      # the three splits of data/processed at 160 px
    python benchmarks/load_speed.py --rounds 5 --image-size 64

Alternates the two (A B A B ...) on the same files and prints each one's min/median/max seconds and
the ratio of medians. "threads" is the loader train.py had before: a ThreadPoolExecutor over
utils.load_image, its arrays stacked at the end. Both give the same pixels (checked on every round).
"""

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.backend import cpu_model  # noqa: E402
from utils.config import DATA_DIR, IMAGE_SIZE  # noqa: E402
from utils.images import load_image, load_images, read_split  # noqa: E402


def threads(paths, size):
    with ThreadPoolExecutor() as pool:
        return np.stack(list(pool.map(lambda p: load_image(p, size), paths)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA_DIR, help="a prepared split (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="side length to decode at (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="times each loader runs (default: %(default)s)")
    args = p.parse_args()
    _, splits = read_split(args.data)
    paths = [path for split_paths, _ in splits for path in split_paths]
    print(f"CPU: {cpu_model()}; {len(paths)} images at {args.image_size} px", flush=True)
    seconds = {"threads": [], "load_images": []}
    for r in range(args.rounds):
        arrays = {}
        for name, load in (("threads", threads), ("load_images", load_images)):
            start = time.perf_counter()
            arrays[name] = load(paths, args.image_size)
            seconds[name].append(time.perf_counter() - start)
            print(f"round {r + 1}: {name} {seconds[name][-1]:.1f} s", flush=True)
        assert np.array_equal(arrays["threads"], arrays["load_images"]), "the two loaders disagree"
        del arrays
    for name, s in seconds.items():
        print(f"{name}: min {min(s):.1f} s, median {statistics.median(s):.1f} s, max {max(s):.1f} s")
    ratio = statistics.median(seconds["threads"]) / statistics.median(seconds["load_images"])
    print(f"load_images is {ratio:.2f}x as fast (ratio of medians)")


if __name__ == "__main__":
    main()
