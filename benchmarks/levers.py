"""Each lever alone: short train.py runs of equal length and seed, one with each lever, and a table of them.

    python benchmarks/levers.py default alternate-flips no-ema --short "--image-size 64 --epochs 5 --progressive 0"
    python benchmarks/levers.py default alternate-flips --data data/flowers --short "--image-size 64 --epochs 20"

A lever is a set of train.py flags, or of settings in utils (such as utils.warps.AUGMENTATION), that the
default does not use (LEVERS). Each run gets the same --short flags and --seed; the runs go one after the
other, and the table gives each one's best validation and test accuracy (the test photo and its mirror, and
the photo alone) and seconds from start. A run already finished in --out is read, not trained again (so once the
default changes, give the new runs another --out).
"""

import argparse
import importlib
import json
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.backend import cpu_model  # noqa: E402
from utils.config import DATA_DIR  # noqa: E402

# name: (train.py flags, {utils setting: value}). The levers of the optimizer set the start as well, as they
# were measured (the default is "muon-dirac"); every other lever changes the default by one thing,
# except "earlier-default" (the earlier default: both of the earlier parts below).
OPTIMIZER, DIRAC = "utils.model.OPTIMIZER[name]", "utils.model.DIRAC_INIT"
STEP, POWER = "utils.warps.SIZE_STEP", "utils.warps.PHASE_POWER"
LEVERS = {
    "default": ([], {}),
    "rmsprop": ([], {OPTIMIZER: "rmsprop", DIRAC: False}),  # the earlier default: RMSprop from a random start
    "alternate-flips": ([], {"utils.warps.AUGMENTATION[horizontal_flip]": "alternate"}),
    "no-ema": (["--ema", "0"], {}),
    "no-label-smoothing": (["--label-smoothing", "0"], {}),
    "label-smoothing-0.1": (["--label-smoothing", "0.1"], {}),
    "no-cutmix": (["--cutmix", "0"], {}),
    "learning-rate-x2": (["--learning-rate", "0.004"], {}),
    "ema-0.997": (["--ema", "0.997"], {}),  # cats and dogs: about one epoch, not 100 steps (the flowers derive it)
    "width-1.5": (["--width", "1.5"], {}),  # every block 1.5 times as wide
    "batch-32": (["--batch-size", "32"], {}),  # cats and dogs: twice the steps an epoch (the flowers derive it)
    # The earlier default's two parts, which the default replaced: its schedule (of the cats-and-dogs split's
    # 30 epochs, 7 each at 64, 96 and 128 px, then 9 at 160) and its stem and first block at 32 filters, not 16.
    # (benchmarks/speedrun.md measured the narrow stem as narrow-schedule-25 with --epochs 30 --progressive
    # 0.57; the default reaches 160 px sooner, and "earlier-160" below is the way back to 0.57.)
    "earlier-schedule": (["--progressive", "0.7"], {STEP: 32, POWER: 0}),
    "earlier-160": (["--progressive", "0.57"], {}),  # 160 px later (cats and dogs: 4 / 13 / 13, not 2 / 7 / 21)
    "wide-stem": ([], {"utils.model.STEM": 32, "utils.model.WIDTHS": [32, 64, 128, 256]}),
    "keras-batch-norm": ([], {"utils.model.FUSED_BATCH_NORM": False}),  # the way back: Keras's own op by op
    "whiten-stem": ([], {"utils.model.WHITEN_STEM": True}),  # airbench's frozen patch-whitening stem
    "airbench-widths": ([], {"utils.model.WIDTHS": [16, 64, 192, 384]}),  # blocks 3 and 4 wider, as airbench's
    # a skip around each block's second convolution (relu1 + relu2), and with it stochastic depth: that
    # convolution's branch dropped for a tenth of the photos
    "residual": ([], {"utils.model.RESIDUAL": True}),
    "residual-drop-path-0.1": ([], {"utils.model.RESIDUAL": True, "utils.model.DROP_PATH": 0.1}),
    "mixup": ([], {"utils.warps.MIX": "mixup"}),  # the --cutmix batches blend whole photos (Mixup) instead
    "dirac-init": ([], {OPTIMIZER: "rmsprop", DIRAC: True}),
    "muon": ([], {OPTIMIZER: "muon", DIRAC: False}),
    "muon-dirac": ([], {OPTIMIZER: "muon", DIRAC: True}),
    **{
        f"sgd-nesterov-{rate}": (["--learning-rate", rate], {OPTIMIZER: "sgd-nesterov", DIRAC: False})
        for rate in ("0.02", "0.05", "0.1", "0.2")
    },
}
LEVERS["earlier-default"] = (LEVERS["earlier-schedule"][0], {**LEVERS["earlier-schedule"][1], **LEVERS["wide-stem"][1]})


def apply(setting, value):
    """Set `module.NAME` or `module.NAME[key]` to value, before train.py runs."""
    owner, name, key = where(setting)
    if key:
        getattr(owner, name)[key] = value
    else:
        setattr(owner, name, value)


def read(setting):
    """The value of `module.NAME` or `module.NAME[key]` now."""
    owner, name, key = where(setting)
    return getattr(owner, name)[key] if key else getattr(owner, name)


def where(setting):
    """(module, NAME, key or "") of a setting `module.NAME` or `module.NAME[key]`."""
    target, _, key = setting.rstrip("]").partition("[")
    module, name = target.rsplit(".", 1)
    return importlib.import_module(module), name, key


def run_lever(name, flags, data, out, seed):
    """metrics.json of train.py with the lever, in a process of its own (it trains once; later calls read it,
    unless the lever's definition changed since: then the run is refused, not read as the new one)."""
    lever = json.loads(json.dumps(LEVERS[name]))
    if not (out / "metrics.json").exists():
        command = [sys.executable, __file__, "--train", name, "--", "--data", str(data), "--out", str(out)]
        subprocess.run([*command, "--seed", str(seed), *flags], check=True, cwd=ROOT)
        (out / "lever.json").write_text(json.dumps(lever))
    if not (out / "lever.json").exists() or json.loads((out / "lever.json").read_text()) != lever:
        sys.exit(f"levers.py: {out} holds a run of another definition of {name!r}; move it away or pass another --out")
    return json.loads((out / "metrics.json").read_text())


def main():
    if sys.argv[1:2] == ["--train"]:  # one run: train.py with the lever's settings and flags, then argv's rest
        name, rest = sys.argv[2], sys.argv[sys.argv.index("--") + 1 :]
        if name not in LEVERS:
            sys.exit(f"levers.py: no lever {name!r}; the levers are: {', '.join(LEVERS)}")
        for setting, value in LEVERS[name][1].items():
            apply(setting, value)
        sys.argv = [str(ROOT / "train.py"), *LEVERS[name][0], *rest]  # rest's flags win
        return runpy.run_path(sys.argv[0], run_name="__main__")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("levers", nargs="+", choices=LEVERS, help="the runs to compare, in order")
    p.add_argument("--data", type=Path, default=DATA_DIR, help="the split (default: %(default)s)")
    runs = ROOT / "runs" / "levers"
    p.add_argument("--out", type=Path, default=runs, help="a folder per split and run (default: %(default)s)")
    short = "--image-size 64 --epochs 5 --progressive 0"
    p.add_argument("--short", default=short, help="flags every run gets (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="every run's seed (default: %(default)s)")
    args = p.parse_args()
    print(f"CPU: {cpu_model()}; every run: {args.short} --seed {args.seed} --data {args.data}", flush=True)
    print("| lever | change | best val | test (mirror) | test (one view) | seconds |\n|---|---|---|---|---|---|")
    for name in args.levers:
        m = run_lever(name, args.short.split(), args.data, args.out / args.data.name / name, args.seed)
        flags, settings = LEVERS[name]
        change = " ".join([*flags, *(f"{k} = {v!r}" for k, v in settings.items())]) or "none"
        print(
            f"| {name} | `{change}` | {m['best_val_accuracy']:.2%} | {m['test_accuracy']:.2%} "
            f"| {m['test_accuracy_plain']:.2%} | {m['train_seconds']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
