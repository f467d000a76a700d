"""Time to a validation accuracy (90 % unless --target): the default train.py against the notebook's 15
epochs, on one machine, in one command.

    python benchmarks/time_to.py --data data/processed
    python benchmarks/time_to.py --target 0.96 --cap 1.0
    python benchmarks/time_to.py --variant "--batch-size 32" --variant "--learning-rate 4e-3"
    python benchmarks/time_to.py --lever muon-dirac --lever "wide-stem --seed 7"

1. Runs one epoch of the notebook's pipeline (baseline.py: 150 px, its augmentation and CNN,
   batch 100) on the full split and takes 15 times its wall time: the baseline's 15 epochs.
2. Runs `python train.py` with its defaults (then with each --variant's extra flags) and stops
   it (Ctrl-C) at the first epoch whose validation accuracy (at full precision, from the run's CSV
   log) reaches --target, or once it has run --cap times the baseline's 15 epochs; the time counts
   from the process's start, data loading included. Each --lever is a run of its own with that lever
   of benchmarks/levers.py (its LEVERS), and any train.py flags after its name. Each run's per-epoch log
   is kept in --out.
Prints both, and the ratio that the goal bounds (GOALS: 0.125 for 90 %, 0.40 for 96 %). With --full each
run goes on to its end instead: it prints the seconds to each of GOALS' targets as the run passes them, then
the whole run's seconds (bounded by WHOLE_RUN on cats and dogs, FLOWERS_RUN on the flowers) and its test
accuracy, so that one command times the speedrun's goals 1, 2 and 3, or goal 4. The baseline's epoch is
always on --baseline-data, the cats-and-dogs split. Nothing else should run on the machine meanwhile.

    python benchmarks/time_to.py --data data/processed --full     # goals 1, 2 and 3
    python benchmarks/time_to.py --data data/flowers --full       # goal 4
"""

import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from levers import LEVERS  # noqa: E402

from utils.backend import cpu_model  # noqa: E402
from utils.config import DATA_DIR  # noqa: E402

GOALS = {0.90: 0.125, 0.96: 0.40}  # the most a run may take to the target, as a share of the baseline's 15 epochs
WHOLE_RUN = 1.85  # the most the whole default run on cats and dogs may take, as a share of the baseline's 15 epochs
FLOWERS_RUN = 10  # the most the whole default run on the flowers may take, in baseline epochs


def baseline_epoch(data, out):
    """Wall seconds of one baseline epoch (training and validation), from its own history."""
    command = [sys.executable, str(ROOT / "benchmarks" / "baseline.py"), "--data", str(data), "--epochs", "1"]
    subprocess.run([*command, "--out", str(out)], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "history.json").read_text())["elapsed_seconds"][0]


def exact_val_accuracy(log_csv, epoch):
    """Epoch `epoch`'s (from 1) validation accuracy at full precision, from train.py's CSV log (written before
    the progress line that prints it rounded to 4 decimals: 2,206 of 2,298 photos, 95.997 %, prints 0.9600)."""
    with open(log_csv) as f:
        return [float(row["val_accuracy"]) for row in csv.DictReader(f) if int(row["epoch"]) == epoch - 1][-1]


def start_train(data, out, flags, lever):
    """`python train.py` (or benchmarks/levers.py's `lever`) on `data` into `out`, its output piped line by line."""
    train = [str(ROOT / "train.py")]
    if lever:
        train = [str(ROOT / "benchmarks" / "levers.py"), "--train", lever, "--"]
    return subprocess.Popen(
        [sys.executable, *train, "--data", str(data), "--out", str(out), *flags],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # each epoch's line as soon as it is printed
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def epoch_ends(proc, out):
    """Echoes a train.py run's output line by line; yields (line, its epoch, the epoch's exact validation accuracy
    on the line that ends an epoch, else None)."""
    epoch = 0
    for line in proc.stdout:
        print("   ", line.rstrip(), flush=True)
        if m := re.match(r"Epoch (\d+)/", line):
            epoch = int(m.group(1))
        ends = "- val_accuracy: " in line  # an epoch's end: its row is in the log by now
        yield line, epoch, exact_val_accuracy(out / ".run" / "log.csv", epoch) if ends else None


def failed(proc):
    sys.exit(f"time_to.py: {' '.join(proc.args[1:])} failed (exit {proc.returncode}); run it alone to see why")


def default_to(target, data, out, limit, flags=(), lever=None):
    """Seconds from the start of `python train.py` (with benchmarks/levers.py's `lever` if given) to the end of
    the first epoch at >= target, and that epoch."""
    start = time.perf_counter()
    proc = start_train(data, out, flags, lever)
    epoch = 0
    for _, epoch, val in epoch_ends(proc, out):
        if val is not None and val >= target:
            seconds = time.perf_counter() - start
            proc.send_signal(signal.SIGINT)
            proc.wait()
            return seconds, epoch
        if val is not None and time.perf_counter() - start > limit:
            break
    proc.send_signal(signal.SIGINT)
    if proc.wait() not in (0, 130) and not epoch:
        failed(proc)
    return None, epoch


def whole_run(targets, data, out, flags=(), lever=None):
    """Runs train.py to its end: {target: (seconds from its start, epoch)} for each target it reached, its
    seconds from start to exit, and its test accuracy line."""
    start = time.perf_counter()
    proc = start_train(data, out, flags, lever)
    reached, test = {}, "no test accuracy printed"
    for line, epoch, val in epoch_ends(proc, out):
        if line.startswith("test accuracy"):
            test = line.strip()
        for target in targets:
            if val is not None and val >= target and target not in reached:
                reached[target] = (time.perf_counter() - start, epoch)
    if proc.wait():
        failed(proc)
    return reached, time.perf_counter() - start, test


def runs_to_time(default, variants, levers):
    """(name, extra train.py flags, lever or None) of each run: the default, each variant, each lever (its name,
    then any extra flags: "wide-stem --seed 7")."""
    runs = [("default", [], None)] if default else []
    return runs + [(v, v.split(), None) for v in variants] + [(lv, lv.split()[1:], lv.split()[0]) for lv in levers]


def ratio(seconds, epoch, goal=None):
    """`seconds` as a share of the baseline's 15 epochs of `epoch` seconds each, and the goal's bound if any."""
    return f"ratio to the baseline's 15 epochs {seconds / (15 * epoch):.3f}" + (f" (goal <= {goal})" if goal else "")


def print_time_to(name, target, data, out, limit, epoch, flags, lever):
    """Times one run to `target` (stopped there, or after `limit` seconds) against a baseline epoch of `epoch` s."""
    seconds, n = default_to(target, data, out, limit, flags, lever)
    if seconds is None:
        print(f"{name}: no {target:.0%} by epoch {n} ({limit:.0f} s)", flush=True)
    else:
        print(
            f"{name}: {target:.0%} validation accuracy at epoch {n}, {seconds:.0f} s after start; "
            + ratio(seconds, epoch, GOALS.get(round(target, 4))),
            flush=True,
        )


def print_whole_run(name, targets, data, out, epoch, flags, lever):
    """Times one run to its end, and to each target on the way, against a baseline epoch of `epoch` s."""
    reached, seconds, test = whole_run(targets, data, out, flags, lever)
    for target in targets:
        if target in reached:
            at, n = reached[target]
            print(f"{name}: {target:.0%} at epoch {n}, {at:.0f} s after start; " + ratio(at, epoch, GOALS.get(target)))
        else:
            print(f"{name}: no {target:.0%} in the whole run")
    bounds = f"goal 2 on cats and dogs <= {WHOLE_RUN}, goal 4 on the flowers <= {FLOWERS_RUN} baseline epochs"
    cost = f"{seconds / epoch:.1f} baseline epochs, " + ratio(seconds, epoch)
    print(f"{name}: the whole run {seconds:.0f} s, {cost} ({bounds}); {test}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA_DIR, help="the full split (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "time_to", help="scratch folder")
    p.add_argument("--target", type=float, default=0.90, help="validation accuracy to reach (default: %(default)s)")
    p.add_argument("--variant", action="append", default=[], help="extra train.py flags to time as well (repeatable)")
    p.add_argument("--skip-default", action="store_true", help="time only the variants and levers")
    p.add_argument(
        "--lever",
        action="append",
        default=[],
        help="a lever of benchmarks/levers.py to time, then any train.py flags: 'wide-stem --seed 7' (repeatable)",
    )
    p.add_argument(
        "--baseline-data", type=Path, default=DATA_DIR, help="the split of the baseline's epoch (default: %(default)s)"
    )
    p.add_argument("--baseline-seconds", type=float, help="one baseline epoch measured earlier on this machine")
    p.add_argument(
        "--cap", type=float, default=1.0, help="stop a run after this share of the baseline's 15 epochs (default: 1)"
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="run each to its end: the seconds to 90 %%, 96 %% and --target, the whole run's, its test accuracy",
    )
    args = p.parse_args()
    for lever in args.lever:  # before the baseline's epoch, not after it
        if lever.split()[0] not in LEVERS:
            p.error(f"--lever {lever!r}: no such lever; the levers are: {', '.join(LEVERS)}")
    print(f"CPU: {cpu_model()}", flush=True)
    epoch = args.baseline_seconds or baseline_epoch(args.baseline_data, args.out / "baseline")
    print(f"baseline: one epoch {epoch} s; 15 epochs {15 * epoch} s", flush=True)
    for i, (name, flags, lever) in enumerate(runs_to_time(not args.skip_default, args.variant, args.lever)):
        out = args.out / f"run{i}"
        if args.full:
            print_whole_run(name, sorted({*GOALS, args.target}), args.data, out, epoch, flags, lever)
        else:
            print_time_to(name, args.target, args.data, out, args.cap * 15 * epoch, epoch, flags, lever)


if __name__ == "__main__":
    main()
