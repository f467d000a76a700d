"""Train the CNN on the split that prepare_data.py wrote: cats and dogs, or any classes.

    python train.py                     # data/processed -> models/
    python train.py --data data/flowers --out models/flowers
    python train.py --epochs 2 --resume # continue an interrupted run in the same --out

0. recipe:   the settings that depend on the data's size (batch, epochs, warm-up, weight averaging, augmentation
             strength, CutMix) are derived from the number of training images (`recipe`, below).
1. data:     the classes from the split's report.json; each split decoded once at --image-size (the same
             load_image that predict.py uses), into memory or, when it does not fit, into a cache on disk.
2. devices:  one CPU or GPU, or several (--devices, --processes); bfloat16 or float16 where they compute it.
3. model:    the CNN of utils.model.build_model, its convolutions started as the identity; Muon warmed up,
             then decayed along a cosine; label smoothing; a moving average of the weights.
4. batches:  shuffled and augmented training batches (utils.augment: one random warp per image and CutMix);
             progressive resizing trains the early epochs on smaller, cheaper images.
5. fit:      each epoch validated with the averaged weights; the best epoch at the final size kept; kill -9
             safe (--resume).
6. evaluate: the best weights in float32 at the final size on the test split, each photo averaged with its
             mirror, as predict.py does.
7. save:     .keras and its LiteRT copy .tflite (both carry the class names and heat maps), labels.txt,
             history.json, metrics.json, test_predictions.json.
"""

import argparse
import contextlib
import shutil
import signal
import sys
import time
from pathlib import Path

from utils.augment import ENGINES, batches
from utils.backend import (
    choose_backend,
    choose_precision,
    cpu_has_bf16,
    device_text,
    gpu_facts,
    has_tensorflow,
    import_keras,
    split_cpu_for_jax,
    training_strategy,
)
from utils.config import DATA_DIR, IMAGE_SIZE, MODEL_DIR
from utils.evaluate import MIRROR_TTA, metrics_of, test_predictions
from utils.export import export_step, save_run
from utils.files import DiskFull, UserError, exclusive, fail, is_disk_full
from utils.fit import (
    best_file,
    check_resume,
    evaluate,
    read_log,
    resume_command,
    start_work,
    state_bytes,
    training_callbacks,
)
from utils.flags import check_train_flags, uneven_batch
from utils.images import load_splits, read_split
from utils.model import build_model, compile_model, stem_kernel, widths
from utils.warps import image_sizes, sample_weights, targets

PROCESS_START = time.perf_counter()  # time to accuracy counts from here

# 0. recipe. It was tuned on the cats-and-dogs split: 18,380 training images, 287 steps of 64 an epoch,
# 30 epochs, a one-epoch warm-up, weight averaging over about 100 steps (0.99). A smaller split gets more
# epochs (each sees fewer images), smaller batches while an epoch would have fewer than MIN_STEPS steps (more
# updates from the same photos), a warm-up of at least WARMUP_STEPS, a weight average over more steps
# (its validation swings more from epoch to epoch; the flowers: 300 steps, about five of their epochs),
# BatchNorm statistics over a third of an epoch, stronger warps and CutMix. The warps themselves are tuned
# in one place: utils.warps.AUGMENTATION.
REFERENCE_IMAGES = 18_380
REFERENCE_EPOCHS = 30
BATCH_SIZE = 64  # the cats-and-dogs batch; halved (the flowers: 32) while an epoch has fewer than MIN_STEPS steps
MIN_STEPS = 50
WARMUP_STEPS = 200
BN_EPOCHS = 0.35  # BatchNorm statistics' window, in epochs (1 / (1 - momentum) steps)
EMA_STEPS = 100  # the weight average's window in steps, times the scale, at most an eighth of the run
MAX_SCALE = 3.0  # a split this many times smaller in square root gets at most 3x the epochs
MAX_AUGMENT = 2.0  # and at most twice the warps
MAX_CUTMIX = 0.5  # and CutMix on at most half of the batches


def recipe(train_images, batch_size=None, epochs=None):
    """Settings derived from the split's size: {batch_size, epochs, warmup_steps, ema, bn_momentum, augment,
    cutmix}. batch_size, epochs: the numbers given by hand, which the others then depend on."""
    if not batch_size:  # BATCH_SIZE, halved down to a quarter of it while an epoch has fewer than MIN_STEPS steps
        batch_size = BATCH_SIZE
        while train_images // batch_size < MIN_STEPS and batch_size > BATCH_SIZE // 4:
            batch_size //= 2
    steps = max(1, train_images // batch_size)
    scale = min(MAX_SCALE, max(1.0, (REFERENCE_IMAGES / max(train_images, 1)) ** 0.5))
    epochs = epochs or round(REFERENCE_EPOCHS * scale)
    return {
        "batch_size": batch_size,
        "epochs": epochs,
        # one epoch, or WARMUP_STEPS where that is at most a tenth of the run
        "warmup_steps": max(steps, min(WARMUP_STEPS, epochs * steps // 10)),
        "ema": round(1 - 1 / max(10, min(EMA_STEPS * scale, epochs * steps / 8)), 3),
        "bn_momentum": round(min(0.99, 1 - 1 / max(10.0, BN_EPOCHS * steps)), 3),
        "augment": round(min(MAX_AUGMENT, scale), 2),
        "cutmix": round(min(MAX_CUTMIX, (scale - 1) * MAX_CUTMIX / 2), 2),
    }


# The recipe's settings, printed at the start and kept in metrics.json
RECIPE = ("batch_size", "epochs", "warmup_steps", "ema", "bn_momentum", "augment", "cutmix", "class_weights")
# Flags that must be the same for --resume to continue a run
RESUMABLE = (
    *("epochs", "batch_size", "image_size", "learning_rate", "seed", "data", "engine", "progressive"),
    *("label_smoothing", "ema", "precision", "warmup_steps", "bn_momentum", "augment", "cutmix"),
    *("class_weights", "width"),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    derived = "(default: from the split's size, see recipe in train.py)"
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=DATA_DIR, help="folder with train/ val/ test/ (default: %(default)s)")
    g.add_argument(
        "--out", type=Path, default=MODEL_DIR, help="where the model and its files go (default: %(default)s)"
    )
    g.add_argument("--seed", type=int, default=42, help="seed of weights, shuffling and warps (default: %(default)s)")
    g.add_argument("--stream", action="store_true", help="read the images from a cache on disk each epoch, not memory")
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="pixels per side (default: %(default)s)")
    g.add_argument("--width", type=float, default=1.0, help="filters of every block times this (default: %(default)s)")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, help=f"passes over the training split {derived}")
    g.add_argument("--batch-size", type=int, help=f"images per training step {derived}")
    g.add_argument("--learning-rate", type=float, default=2e-3, help="the optimizer's peak rate (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, help=f"steps of the learning rate's linear warm-up {derived}")
    g.add_argument(
        "--label-smoothing", type=float, default=0.05, help="targets' share of uniform (default: %(default)s)"
    )
    g.add_argument("--ema", type=float, help=f"momentum of the weights' moving average, 0 = off {derived}")
    g.add_argument("--bn-momentum", type=float, help=f"momentum of BatchNorm's statistics {derived}")
    g.add_argument(
        "--progressive", type=float, default=0.3, help="share of epochs on smaller images (default: %(default)s)"
    )
    g = p.add_argument_group("augmentation")
    g.add_argument("--engine", choices=ENGINES, help="tf.data warps, NumPy, or ImageDataGenerator (default: layers)")
    g.add_argument("--augment", type=float, help=f"strength of the random warps {derived}")
    g.add_argument("--cutmix", type=float, help=f"share of the batches mixed by CutMix {derived}")
    g.add_argument("--class-weights", choices=("none", "balanced"), default="none", help="weigh rare classes up")
    g.add_argument("--workers", type=int, default=2, help="threads (numpy) or processes (idg) making batches")
    g = p.add_argument_group("hardware and scale")
    precisions = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
    g.add_argument("--precision", choices=precisions, default="auto", help="auto: 16-bit where the device has it")
    g.add_argument("--devices", type=int, metavar="N", help="train data-parallel on N GPUs, or N parts of the CPU")
    g.add_argument("--processes", type=int, default=1, metavar="N", help="JAX: train in N processes or hosts")
    g.add_argument("--process-id", type=int, default=0, metavar="I", help="with --processes: this one's number")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="with --processes: where process 0 listens")
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue the unfinished run in --out (same flags)")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard logs to OUT/logs")
    g.add_argument("--export", type=Path, metavar="MODEL.keras", help="train nothing: write a .keras's .tflite")
    args = p.parse_args(argv)
    args.engine = args.engine or ("layers" if has_tensorflow() else "numpy")
    check_train_flags(p, args)
    if args.process_id:
        args.out = args.out / f".process-{args.process_id}"  # process 0 writes --out
    return args


def resolve_recipe(args, train_images):
    """Fill the flags left unset with `recipe`'s values for this split; return the names of those derived."""
    derived = []
    for key, value in recipe(train_images, args.batch_size, args.epochs).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            derived.append(key)
    if args.engine == "idg" and "cutmix" in derived:
        args.cutmix = 0.0  # ImageDataGenerator's batches are not mixed
    uneven = "batch_size" in derived and uneven_batch(args.batch_size, args.devices, args.processes)
    if uneven:
        raise UserError(f"{uneven} (derived); set --batch-size")
    return derived


def main(argv=None):
    choose_backend()
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    split_cpu_for_jax(args.devices)
    if args.export:
        try:
            return export_step(args.export)
        except UserError as e:
            fail(str(e))
    # Ctrl-C must reach us even when started from a shell that ignores it (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out, work = args.out, args.out / ".run"  # .run holds the unfinished run's backup and log
    try:
        class_names, splits = read_split(args.data)
        derived = resolve_recipe(args, len(splits[0][0]))
        config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in RESUMABLE}
        config["image_sizes"] = image_sizes(args.image_size, args.epochs, args.progressive)  # utils.warps may change it
        if args.resume:
            check_resume(work, config)
        with exclusive(out / ".lock", f"--out {out}"):
            return train(args, out, work, config, derived, class_names, splits)
    except Exception as e:
        if not isinstance(e, UserError) and not is_disk_full(e):
            raise
        message = str(e) if isinstance(e, UserError) else str(DiskFull(out, 0))
        if (isinstance(e, DiskFull) or is_disk_full(e)) and read_log(work / "log.csv"):
            message += f"; then continue with: {resume_command(argv)}"
        fail(message)
    except KeyboardInterrupt:
        if not (work / "config.json").exists():  # stopped while loading: there is nothing to resume yet
            fail(f"interrupted before training began; start again with: {resume_command(argv, resume=False)}", 130)
        done = len(read_log(work / "log.csv"))
        fail(f"interrupted after {done} finished epoch(s) of {args.epochs}; continue with: {resume_command(argv)}", 130)


def train(args, out, work, config, derived, class_names, splits):
    # 1. data, before TensorFlow or JAX start their thread pools (the loader forks)
    (x_train, y_train, _), (x_val, y_val, _), test = load_data(args, class_names, splits, derived)

    # 2. devices and precision (TensorFlow must not have started its devices yet, nor JAX met the others)
    strategy, devices = training_strategy(args.devices, args.processes, args.process_id, args.coordinator)
    keras = import_keras()
    keras.utils.set_random_seed(args.seed)
    gpus = gpu_facts()
    precision = args.precision if args.precision != "auto" else choose_precision(gpus, cpu_has_bf16())
    keras.mixed_precision.set_global_policy(precision)

    # 3. model: any image size (progressive resizing), except for ImageDataGenerator's one size
    sizes = config["image_sizes"]  # progressive resizing: the image size of each epoch
    steps = len(x_train) // args.batch_size
    hyper = ("width", "bn_momentum", "epochs", "learning_rate", "warmup_steps", "label_smoothing", "ema")
    size = args.image_size if args.engine == "idg" else None
    stem = stem_kernel(x_train)  # None: the stem trains from a random start (utils.model.WHITEN_STEM)
    with strategy.scope() if strategy else contextlib.nullcontext():  # variables on every device
        model = compile_model(class_names, size, steps, **{k: getattr(args, k) for k in hyper}, stem_filters=stem)
    first = start_work(work, config, args.resume, need=4 * state_bytes(model) + 2 * 4 * model.count_params())

    # 4. batches, augmented, from the first epoch still to train; part: this process's share of each batch
    y_fit = targets(y_train, len(class_names))
    w_fit = sample_weights(y_train, len(class_names), args.class_weights)
    part, first_epoch = (args.process_id, args.processes), min(first, args.epochs - 1)
    plan = (args.batch_size, args.seed, sizes, first_epoch, args.augment, args.cutmix, args.workers, part)
    train_batches = batches(args.engine, x_train, y_fit, w_fit, *plan)
    print(f"precision {precision}; devices {', '.join(devices)}; image size by epoch {sizes}", flush=True)

    # 5. fit; elapsed_seconds count from this process's start, plus what earlier runs of a resumed one took
    previous = read_log(work / "log.csv")
    offset = previous[-1]["elapsed_seconds"] if previous else 0.0
    elapsed, logs = (lambda: offset + time.perf_counter() - PROCESS_START), args.tensorboard and out / "logs"
    callbacks = training_callbacks(model, work, sizes, x_val, y_val, args.engine, args.epochs, elapsed, logs)
    verbose = 1 if sys.stdout.isatty() else 2  # a progress bar on a terminal, a line per epoch in logs
    model.fit(
        train_batches,
        epochs=args.epochs,
        steps_per_epoch=steps,
        shuffle=False,  # the batches are shuffled per epoch already
        callbacks=callbacks,
        verbose=verbose,
    )
    run = {"train_images": len(x_train), "val_images": len(x_val), "image_size": args.image_size}
    run |= {"recipe": {k: getattr(args, k) for k in RECIPE}}
    run |= {"parameters": model.count_params()}  # the final model's too: no weight depends on the image size
    run |= {"precision": precision, "engine": args.engine, "device": device_text(gpus, devices)}
    return evaluate_and_save(out, model, work, class_names, test, run, args.width, litert=not args.process_id)


def load_data(args, class_names, splits, derived):
    """Step 1: each split (images, labels, paths) at --image-size, in memory or streamed; says what it loaded."""
    started = time.perf_counter()
    loaded = load_splits(args.data, splits, args.image_size, args.batch_size, args.stream)
    counts = [len(labels) for _, labels, _ in loaded]
    if counts[0] < args.batch_size:
        raise UserError(
            f"{args.data}/train has {counts[0]} images, fewer than --batch-size {args.batch_size}; "
            "lower --batch-size or prepare more images"
        )
    print(
        f"loaded train {counts[0]}, val {counts[1]}, test {counts[2]} images of {len(class_names)} classes "
        f"at {args.image_size}px in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    recipe_line = ", ".join(f"{k} {getattr(args, k)}" + (" (derived)" if k in derived else "") for k in RECIPE)
    print(f"recipe: {recipe_line}", flush=True)
    return loaded


def evaluate_and_save(out, model, work, class_names, test, run, width, litert):
    """Steps 6 and 7: the best epoch's averaged weights, in float32 at the final size, on the test split;
    then the model files, history, metrics and test predictions saved (litert: the .tflite too, on another
    backend than TensorFlow); the unfinished run's files go."""
    x_test, y_test, test_paths = test
    log = read_log(work / "log.csv")
    model.load_weights(best_file(work, run["image_size"]))
    import_keras().mixed_precision.set_global_policy("float32")
    final = build_model(run["image_size"], class_names, widths=widths(width))
    final.set_weights(model.get_weights())
    plain, both = evaluate(final, x_test)
    prob = both if MIRROR_TTA else plain  # what utils.evaluate.class_probabilities, and so predict.py, gives
    history = metrics_of(log, prob, plain, y_test, class_names, run)
    predictions = test_predictions(test_paths, y_test, prob, class_names)
    saved = save_run(out, final, class_names, history, predictions, litert)
    shutil.rmtree(work, ignore_errors=True)
    m = history["metrics"]
    print(
        f"test accuracy {m['test_accuracy']:.4f} on {len(y_test)} images (best epoch {m['best_epoch']}, "
        f"val {m['best_val_accuracy']:.4f}; macro F1 {m['macro_f1']:.4f}); {m['train_seconds']:.0f} s from start "
        f"to last epoch; saved {' and '.join(map(str, saved))}"
    )
    return m


if __name__ == "__main__":
    main()
