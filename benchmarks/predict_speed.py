"""predict.py's speed: one image vs `import tensorflow`, and images/s on a folder.

    python benchmarks/predict_speed.py data/processed/test --count 2000 --rounds 5

Alternates, --rounds times: `python -c "import tensorflow"`, `predict.py` on one image,
and `predict.py` on a folder of --count images. Throughput after start-up is
(count - 1) / (folder time - one-image time) within each round.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils import list_images  # noqa: E402


def seconds(*command):
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="folder of images to predict")
    p.add_argument("--count", type=int, default=2000, help="images in the folder run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="repetitions (default: %(default)s)")
    args = p.parse_args()
    files = list_images(args.folder)[: args.count]
    with tempfile.TemporaryDirectory() as tmp:
        for i, f in enumerate(files):
            shutil.copy(f, Path(tmp) / f"{i:05d}{f.suffix}")
        rows = []
        for r in range(args.rounds):
            tf = seconds("-c", "import tensorflow")
            one = seconds("predict.py", str(files[0]))
            many = seconds("predict.py", tmp)
            rows.append((tf, one, many, (len(files) - 1) / (many - one), one / tf))
            print(
                f"round {r + 1}: import tensorflow {tf:.2f} s, one image {one:.2f} s ({one / tf:.2f}x), "
                f"{len(files)} images {many:.2f} s",
                flush=True,
            )
    names = (
        "import tensorflow s",
        "one image s",
        f"{len(files)} images s",
        "images/s after start",
        "one image / import tf",
    )
    for i, name in enumerate(names):
        v = [row[i] for row in rows]
        print(f"{name:>22}: min {min(v):.2f} / median {statistics.median(v):.2f} / max {max(v):.2f}")


if __name__ == "__main__":
    main()
