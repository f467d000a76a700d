"""Milliseconds per training step of the CNN under each optimizer benchmarks/levers.py compares (and with
each --lever of its settings in utils), and of the optimizer's update alone (random gradients, in a
tf.function), timed in turn in one process.

    python benchmarks/optimizer_step.py --steps 20 --rounds 3
    python benchmarks/optimizer_step.py --optimizer muon --image-size 128 --precision float32
    python benchmarks/optimizer_step.py --optimizer muon --lever default --lever keras-batch-norm
"""

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from levers import LEVERS, OPTIMIZER, apply, read  # noqa: E402

import utils.model  # noqa: E402
from utils.backend import cpu_model, import_keras  # noqa: E402

OPTIMIZERS = ("rmsprop", "muon", "sgd-nesterov")


@contextlib.contextmanager
def lever_set(name):
    """A context in which the utils settings of LEVERS[name] hold (its train.py flags are not taken); the
    settings in use before come back after it. Steps read some when they are traced, so trace inside it."""
    settings = LEVERS[name][1]
    before = {setting: copy.deepcopy(read(setting)) for setting in settings}
    for setting, value in settings.items():
        apply(setting, value)
    try:
        yield
    finally:
        for setting, value in before.items():
            apply(setting, value)


def compiled(name, image_size, steps):
    """The default CNN compiled with optimizer `name` for one epoch of `steps`."""
    utils.model.OPTIMIZER["name"] = name
    hyper = dict(width=1.0, bn_momentum=0.99, epochs=1, learning_rate=2e-3, warmup_steps=1, label_smoothing=0.05)
    return utils.model.compile_model(("cat", "dog"), image_size, steps, ema=0.99, **hyper)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64, help="pixels per side (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="steps timed per round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of all optimizers in turn (default: %(default)s)")
    p.add_argument("--optimizer", action="append", choices=OPTIMIZERS, help="time only these (default: all)")
    p.add_argument(
        "--lever",
        action="append",
        choices=[name for name, (flags, settings) in LEVERS.items() if not flags and OPTIMIZER not in settings],
        help="time with the utils settings of this lever of benchmarks/levers.py, other than an optimizer's "
        "(--optimizer picks those; repeatable; default: default)",
    )
    p.add_argument(
        "--precision",
        choices=("float32", "mixed_bfloat16"),
        default="float32",
        help="the precision policy of the steps (default: %(default)s; train.py takes bfloat16 where the CPU has it)",
    )
    args = p.parse_args()
    import_keras().mixed_precision.set_global_policy(args.precision)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch_size * args.steps, args.image_size, args.image_size, 3), "uint8")
    labels = rng.integers(0, 2, len(images)).astype("float32")
    kinds = [(name, lever) for name in args.optimizer or OPTIMIZERS for lever in args.lever or ["default"]]
    models = {}
    for name, lever in kinds:  # the first epoch traces the step: not timed
        with lever_set(lever):
            models[name, lever] = compiled(name, args.image_size, args.steps)
            models[name, lever].fit(images, labels, batch_size=args.batch_size, epochs=1, verbose=0)
    seconds = {kind: [] for kind in models}
    for _ in range(args.rounds):
        for kind, model in models.items():
            clock = step_clock()
            model.fit(images, labels, batch_size=args.batch_size, epochs=1, verbose=0, callbacks=[clock])
            seconds[kind].append(statistics.median(clock.seconds))
    size, batch, steps, rounds = args.image_size, args.batch_size, args.steps, args.rounds
    print(f"CPU: {cpu_model()}; {args.precision}; {size} px, batch {batch}, {steps} steps, {rounds} rounds")
    for (name, lever), model in models.items():  # a step: the median of a round's steps, median over rounds
        with lever_set(lever):
            step, update = statistics.median(seconds[name, lever]), update_seconds(model, args.rounds)
        print(f"{name:13s} {lever:22s} median {step * 1000:6.1f} ms a step, {update * 1000:5.1f} ms of it the update")


def step_clock():
    """A callback that keeps the wall time of each training step (batch in, weights updated) in .seconds,
    so that what fit does between steps (slicing the arrays) is not counted."""

    class StepClock(import_keras().callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    clock = StepClock()
    clock.seconds = []
    return clock


def update_seconds(model, rounds, calls=20):
    """Median seconds of one optimizer update of all trainable weights, with random gradients."""
    import tensorflow as tf

    weights = model.trainable_variables
    rng = np.random.default_rng(0)
    gradients = [tf.constant(rng.normal(size=w.shape).astype("float32")) for w in weights]
    update = tf.function(lambda: model.optimizer.apply(gradients, weights))
    update()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            update()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


if __name__ == "__main__":
    main()
