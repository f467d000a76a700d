"""Streaming vs in memory: one epoch's time, its peak memory, and a 3x larger split's peak memory.

    python benchmarks/stream.py                         # full split in data/processed, 1 epoch at 160 px
    python benchmarks/stream.py --image-size 64 --copies 3

Runs `train.py --epochs 1` as a child process (on --data, in memory and with --stream), and reads the
epoch's seconds from Keras's line, the validation accuracy from history.json, and the child's peak
resident memory from wait4. --copies N makes a split N times larger (links to each file N times,
under runs/streamN) and trains it streamed only (it may not fit in memory: that is the point).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def copies(data, n):
    """data's split with every file linked n times (a_, b_, ... names), as a new folder."""
    out = ROOT / "runs" / f"stream{n}x" / "data"
    if not out.exists():
        for split in ("train", "val", "test"):
            for folder in sorted((data / split).iterdir()):
                (out / split / folder.name).mkdir(parents=True)
                for f in folder.iterdir():
                    for k in range(n):
                        (out / split / folder.name / f"{'abcdefgh'[k]}_{f.name}").symlink_to(f.resolve())
        shutil.copy(data / "report.json", out / "report.json")
    return out


def train(data, out, size, stream):
    command = [sys.executable, "train.py", "--data", str(data), "--out", str(out), "--epochs", "1"]
    command += ["--image-size", str(size)] + (["--stream"] if stream else [])
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak resident memory
        child.returncode = os.waitstatus_to_exitcode(status)
    stdout = (out.parent / f"{out.name}.log").read_text()
    if child.returncode:
        sys.exit(stdout[-2000:])
    peak = usage.ru_maxrss / 1024  # MB
    epoch = re.search(r"^\d+/\d+ - (\d+)s", stdout, re.M)
    history = json.loads((out / "history.json").read_text())
    return {
        "data": str(data),
        "stream": stream,
        "image size": size,
        "epoch s": int(epoch.group(1)) if epoch else None,
        "whole run s": round(time.perf_counter() - start),
        "val accuracy": history["val_accuracy"][-1],
        "peak resident MB": round(peak),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--copies", type=int, default=0, help="also a split this many times larger, streamed")
    p.add_argument("--skip-memory", action="store_true", help="only the streamed runs")
    args = p.parse_args()
    runs = [] if args.skip_memory else [(args.data, False)]
    runs += [(args.data, True)] + ([(copies(args.data, args.copies), True)] if args.copies else [])
    for data, stream in runs:
        row = train(data, ROOT / "runs" / f"stream-{len(str(data))}-{stream}", args.image_size, stream)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
