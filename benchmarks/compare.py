"""Baseline vs default, side by side: training throughput and time to 90% validation accuracy.

    python benchmarks/compare.py --data data/processed --rounds 5 --steps 20

Throughput: alternates A (the notebook's pipeline, baseline.py) and B (train.py's
default: ImageDataGenerator in worker processes, the small CNN at 64 px) for --rounds
rounds of --steps training steps each, timing only the steps (after one warm-up step),
so both see the same machine load. Prints images/s of each and the B/A ratio with its
min/median/max. Time to 90%: read from the histories (elapsed_seconds per epoch).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import baseline  # noqa: E402
import train  # noqa: E402
from utils import DATA_DIR, build_model, import_keras  # noqa: E402


def timed_steps(keras, model, batches, steps, batch_size):
    """Images per second over `steps` training steps of model.fit, after one warm-up step.

    fit() reads `batches` the way train.py's run does (worker processes for a PyDataset that
    asks for them), so the time includes any wait for augmented batches.
    """
    marks = []
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: marks.append(time.perf_counter()))
    model.fit(batches, epochs=1, steps_per_epoch=steps + 1, verbose=0, callbacks=[timer])
    return steps * batch_size / (marks[-1] - marks[0])


def time_to(history_path, target):
    if not history_path.exists():
        return None
    h = json.loads(history_path.read_text())
    for acc, sec in zip(h["val_accuracy"], h.get("elapsed_seconds", []), strict=False):
        if acc >= target:
            return sec
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA_DIR, help="split from prepare_data.py (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="A/B pairs (default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="training steps per measurement (default: %(default)s)")
    p.add_argument("--history", type=Path, default=ROOT / "models" / "history.json", help="default run's history")
    p.add_argument("--baseline-history", type=Path, default=ROOT / "runs" / "baseline" / "history.json")
    args = p.parse_args()
    keras = import_keras()
    keras.utils.set_random_seed(0)

    a_model, (a_batches, _) = baseline.build(), baseline.flows(args.data)
    d = train.parse_args([])  # train.py's defaults, so B is exactly what `python train.py` runs
    x, y, _ = train.load_split(args.data, "train", d.image_size)
    b_batches = train.idg_batches(x, y, d.batch_size, seed=0, workers=d.workers)
    b_model = build_model(d.image_size)
    b_model.compile(
        keras.optimizers.RMSprop(d.learning_rate), "binary_crossentropy", metrics=["accuracy"], jit_compile=False
    )
    a_rates, b_rates = [], []
    for r in range(args.rounds):
        a_rates.append(timed_steps(keras, a_model, a_batches, args.steps, baseline.BATCH))
        b_rates.append(timed_steps(keras, b_model, b_batches, args.steps, d.batch_size))
        print(f"round {r + 1}: baseline {a_rates[-1]:6.1f} img/s   default {b_rates[-1]:6.1f} img/s", flush=True)
    ratios = [b / a for a, b in zip(a_rates, b_rates, strict=True)]
    fmt = lambda v: f"min {min(v):.1f} / median {statistics.median(v):.1f} / max {max(v):.1f}"  # noqa: E731
    print(f"baseline img/s: {fmt(a_rates)}")
    print(f"default  img/s: {fmt(b_rates)}")
    print(f"ratio default/baseline: {fmt(ratios)}")
    for name, path in (("default", args.history), ("baseline", args.baseline_history)):
        t = time_to(path, 0.90)
        print(f"{name}: 90% validation accuracy after {t} s" if t else f"{name}: no 90% in {path} (or no such file)")


if __name__ == "__main__":
    main()
