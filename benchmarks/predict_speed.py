"""predict.py's speed on both runtimes: one image vs `import tensorflow`, and images/s on a folder.

    python benchmarks/predict_speed.py data/processed/test --count 2000 --rounds 5
    python benchmarks/predict_speed.py data/processed/test --explain-only   # predict.py --explain's cost

Alternates, --rounds times: `python -c "import tensorflow"`, then for the LiteRT (.tflite)
and the Keras (.keras) model: `predict.py` on one image and on a folder of --count images.
Throughput after start-up is (count - 1) / (folder time - one-image time) within each round.
--explain adds the LiteRT model with --explain (heat-map pictures written to a temporary folder):
one image against `import tensorflow`, and the folder's speed against the same without --explain.
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
from utils.config import LITERT_FILE, MODEL_DIR, MODEL_FILE  # noqa: E402
from utils.images import list_images  # noqa: E402


def seconds(*command):
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="folder of images to predict")
    p.add_argument("--count", type=int, default=2000, help="images in the folder run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="repetitions (default: %(default)s)")
    p.add_argument("--litert", type=Path, default=MODEL_DIR / LITERT_FILE, help="(default: %(default)s)")
    p.add_argument("--keras", type=Path, default=MODEL_DIR / MODEL_FILE, help="(default: %(default)s)")
    p.add_argument("--explain", action="store_true", help="also time --explain with the LiteRT model")
    p.add_argument("--explain-only", action="store_true", help="time only the LiteRT model, with and without --explain")
    args = p.parse_args()
    files = list_images(args.folder)[: args.count]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, f in enumerate(files):
            shutil.copy(f, Path(tmp) / f"{i:05d}{f.suffix}")
        for r in range(args.rounds):
            row = {"import tensorflow s": seconds("-c", "import tensorflow")}
            models = [("litert", args.litert.resolve()), ("keras", args.keras.resolve())]
            for name, model in models[: 1 if args.explain_only else 2]:
                one = seconds("predict.py", str(files[0]), "--model", str(model))
                many = seconds("predict.py", tmp, "--model", str(model))
                row[f"{name} one image s"] = one
                row[f"{name} {len(files)} images s"] = many
                row[f"{name} images/s after start"] = (len(files) - 1) / (many - one)
            tf = row["import tensorflow s"]
            row["litert one image / import tf"] = row["litert one image s"] / tf
            if not args.explain_only:
                row["keras one image / import tf"] = row["keras one image s"] / tf
                row["litert / keras images/s"] = row["litert images/s after start"] / row["keras images/s after start"]
            if args.explain or args.explain_only:
                with tempfile.TemporaryDirectory() as pictures:
                    explain = ("--model", str(args.litert.resolve()), "--explain", "--explain-dir", pictures)
                    row["explain one image s"] = seconds("predict.py", str(files[0]), *explain)
                    row[f"explain {len(files)} images s"] = seconds("predict.py", tmp, *explain)
                row["explain one image / import tf"] = row["explain one image s"] / tf
                row["explain folder speed / without"] = (
                    row[f"litert {len(files)} images s"] / row[f"explain {len(files)} images s"]
                )
            rows.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    width = max(map(len, rows[0]))
    for name in rows[0]:
        v = [row[name] for row in rows]
        print(f"{name:>{width}}: min {min(v):.3f} / median {statistics.median(v):.3f} / max {max(v):.3f}")


if __name__ == "__main__":
    main()
