"""The checks of train.py's flags that argparse cannot make alone: each refusal is one line."""

from utils.backend import backend, has_tensorflow


def check_train_flags(p, args):
    """Refuse flags that cannot work together, each with one line (argparse's error)."""
    for name in ("epochs", "batch_size", "image_size", "workers", "warmup_steps", "devices", "processes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.engine in ("layers", "idg") and not has_tensorflow():
        p.error(f"--engine {args.engine} needs TensorFlow, which is not installed here; use --engine numpy")
    if args.image_size < 32:
        p.error("--image-size must be at least 32 (the network halves it five times)")
    if not 0 <= args.progressive < 1:
        p.error("--progressive must be in [0, 1)")
    if args.width <= 0:
        p.error("--width must be above 0")
    if args.augment is not None and args.augment < 0:
        p.error("--augment must be 0 or more")
    if args.cutmix is not None and not 0 <= args.cutmix <= 1:
        p.error("--cutmix must be in [0, 1]")
    if args.engine == "idg" and args.cutmix:
        p.error("--engine idg does not mix batches; add --cutmix 0")
    if not 0 <= args.label_smoothing < 1 or not 0 <= (args.ema or 0) < 1 or not 0 <= (args.bn_momentum or 0) < 1:
        p.error("--label-smoothing, --ema and --bn-momentum must be in [0, 1)")
    if args.batch_size and (uneven := uneven_batch(args.batch_size, args.devices, args.processes)):
        p.error(uneven)
    if args.processes > 1:
        if backend() != "jax":
            p.error("--processes trains on the JAX backend: start each process with KERAS_BACKEND=jax")
        if not args.coordinator:
            p.error("--processes needs --coordinator HOST:PORT, the address of process 0")
        if args.engine == "idg":
            p.error("--engine idg does not split batches between processes; use --engine numpy or layers")
        if not 0 <= args.process_id < args.processes:
            p.error(f"--process-id must be 0 to {args.processes - 1}")
    elif args.process_id or args.coordinator:
        p.error("--process-id and --coordinator go with --processes N (N > 1)")
    if args.engine == "idg" and args.progressive:
        p.error("--engine idg trains at one size; add --progressive 0")
    if args.engine == "numpy" and not args.export and backend() == "tensorflow":
        p.error(
            "--engine numpy feeds the JAX backend; on TensorFlow leave --engine out (tf.data makes the same batches)"
        )


def uneven_batch(batch_size, devices, processes):
    """Why batch_size cannot be split between the devices of all processes, or None where it can."""
    if devices and batch_size % devices:
        return f"--batch-size {batch_size} must split evenly between --devices {devices}"
    if batch_size % (processes * (devices or 1)):
        return f"--batch-size {batch_size} must split evenly between the processes' devices"
    return None
