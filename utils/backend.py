"""Keras's backend and the hardware: TensorFlow or JAX, precision by device, data-parallel strategies."""

import importlib.util
import os
import platform
import sys
from pathlib import Path

from utils.files import UserError, fail, quiet_stderr


def choose_backend():
    """Before Keras is imported: Keras's default backend is TensorFlow; where TensorFlow is not installed and
    KERAS_BACKEND is not set, use JAX (which trains and predicts with the same scripts), and say so once."""
    if "KERAS_BACKEND" in os.environ or has_tensorflow():
        return
    if not importlib.util.find_spec("jax"):
        fail("neither TensorFlow nor JAX is installed here, and Keras needs one: `pip install -r requirements.txt`")
    os.environ["KERAS_BACKEND"] = "jax"
    print("TensorFlow is not installed here: Keras runs on JAX (KERAS_BACKEND=jax)", file=sys.stderr, flush=True)


def import_keras():
    """Import Keras without TensorFlow's start-up chatter on stderr; TensorFlow itself only on its backend
    (on JAX, training needs no TensorFlow)."""
    keras = keras_alone()
    if keras.backend.backend() == "tensorflow":
        with quiet_stderr():
            import tensorflow as tf

            tf.config.list_logical_devices()  # device start-up happens here, while muted
    return keras


def keras_alone():
    """Keras imported on the backend choose_backend picks, quietly, without starting TensorFlow's devices."""
    choose_backend()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    with quiet_stderr():
        import keras

    return keras


def has_tensorflow():
    """Whether TensorFlow is installed here (found, not imported)."""
    return importlib.util.find_spec("tensorflow") is not None


def backend():
    """The Keras backend this run uses (KERAS_BACKEND, else Keras's own configuration), read without
    starting TensorFlow's devices (training_strategy may still split the CPU)."""
    return keras_alone().backend.backend()


def jax_strategy(devices, processes=1, process_id=0, coordinator=None):
    """(None, the devices' names) for --devices on the JAX backend: several devices train data-parallel through
    keras.distribution.DataParallel, set for the whole run: GPUs, or without them the CPU's devices, which
    main makes with XLA_FLAGS --xla_force_host_platform_device_count before JAX starts. With --processes, first
    joins the other processes (jax.distributed, which waits for all of them), then trains on the devices of
    all; each process feeds its own share of every batch (so Keras must not shard the batches again)."""
    keras = import_keras()
    if processes > 1:
        print(f"process {process_id} of {processes}: waiting for the others at {coordinator}", flush=True)
        try:
            keras.distribution.initialize(job_addresses=coordinator, num_processes=processes, process_id=process_id)
        except Exception as e:  # an address that does not resolve, a port in use, a process that never came
            raise UserError(f"--coordinator {coordinator}: the processes could not meet ({e})") from None
    import jax

    local = jax.local_devices()
    gpus = [d for d in local if d.platform != "cpu"]
    available = gpus or local
    n = devices or max(len(gpus), 1)
    if n > len(available):
        raise UserError(
            f"--devices {n}: JAX sees {len(available)} device(s) here (a CPU shows {n} with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n}, set before JAX starts)"
        )
    # the first n devices of each process (every process is started alike)
    used = [d for p in range(processes) for d in [d for d in jax.devices() if d.process_index == p][:n]]
    if len(used) > 1:
        parallel = keras.distribution.DataParallel(devices=used, auto_shard_dataset=processes == 1)
        keras.distribution.set_distribution(parallel)
    return None, [str(d) for d in used]


def training_strategy(devices, processes=1, process_id=0, coordinator=None):
    """(tf.distribute strategy, the devices' names) for --devices: None for one device; several GPUs, or
    several logical devices of the one CPU (which TensorFlow must be told before it starts its devices).
    On the JAX backend: jax_strategy."""
    if backend() == "jax":
        return jax_strategy(devices, processes, process_id, coordinator)
    with quiet_stderr():
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
    n = devices or max(len(gpus), 1)
    if gpus and n > len(gpus):
        raise UserError(f"--devices {n}: this machine has {len(gpus)} GPU(s)")
    if n == 1:
        return None, ["/gpu:0" if gpus else "/cpu:0"]
    if gpus:
        names = [f"/gpu:{i}" for i in range(n)]
    else:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
        names = [f"/cpu:{i}" for i in range(n)]
    with quiet_stderr():
        return tf.distribute.MirroredStrategy(names), names


def choose_precision(gpus, cpu_bf16):
    """The compute type of training for the devices at hand: gpus, a list of (name, compute capability as
    (major, minor) or None); cpu_bf16, whether the CPU computes bfloat16 natively (cpu_has_bf16).

    GPU from compute capability 7.0 (V100, T4, A100, H100): mixed_float16 (Keras scales the loss itself);
    older or unknown GPUs: float32 (TensorFlow runs many bfloat16 ops of a GPU on the CPU, tensorflow#58138);
    no GPU: mixed_bfloat16 where the CPU has it, float32 elsewhere (emulated bfloat16 is slower)."""
    if gpus:
        capabilities = [cc for _, cc in gpus]
        return "mixed_float16" if all(cc and tuple(cc) >= (7, 0) for cc in capabilities) else "float32"
    return "mixed_bfloat16" if cpu_bf16 else "float32"


def gpu_facts():
    """[(name, (major, minor) or None)] of the GPUs the Keras backend sees: TensorFlow's or JAX's."""
    keras = import_keras()
    facts = []
    if keras.backend.backend() == "jax":
        import jax

        for device in jax.devices():
            if device.platform == "gpu":
                cc = getattr(device, "compute_capability", None)
                facts.append((device.device_kind, tuple(int(v) for v in str(cc).split(".")[:2]) if cc else None))
        return facts
    import tensorflow as tf

    for device in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(device)
        facts.append((details.get("device_name", device.name), details.get("compute_capability")))
    return facts


def cpu_facts(cpuinfo=Path("/proc/cpuinfo")):
    """The first processor's fields of /proc/cpuinfo, stripped; {} where there is none (macOS, Windows)."""
    try:
        first = cpuinfo.read_text().split("\n\n")[0].splitlines()
    except OSError:
        return {}
    return {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in first)}


BF16_UNITS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's flags of the units that compute bfloat16


def cpu_has_bf16(cpuinfo=Path("/proc/cpuinfo")):
    """True when the CPU computes bfloat16 natively (AVX512_BF16 or AMX); elsewhere it is emulated and slow."""
    flags = cpu_facts(cpuinfo).get("flags", "").split()
    return any(flag in flags for flag in BF16_UNITS)


def cpu_model(cpuinfo=Path("/proc/cpuinfo")):
    """The CPU's name, family, model and vector units, for metrics.json and the benchmarks' logs: timings are
    only comparable on one machine, and under a hypervisor one name ("AMD EPYC") stands for several CPUs."""
    facts = cpu_facts(cpuinfo)
    if not facts:
        return platform.processor() or platform.machine()
    units = [unit for unit in ("avx2", "avx512f", *BF16_UNITS) if unit in facts.get("flags", "").split()]
    family, model = facts.get("cpu family", "?"), facts.get("model", "?")
    return f"{facts.get('model name', '?')} (family {family} model {model}; {' '.join(units) or 'no AVX2'})"


def split_cpu_for_jax(devices):
    """--devices N on JAX without GPUs: JAX shows a CPU as N devices only when told before it starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    if (devices or 1) > 1 and os.environ.get("KERAS_BACKEND") == "jax" and "device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()


def device_text(gpus, devices):
    """What trained, for metrics.json: the GPUs with their compute capability, or cpu; and the devices of a
    data-parallel run."""
    text = ", ".join(f"{name} (compute capability {'.'.join(map(str, cc or ('?',)))})" for name, cc in gpus)
    return (text or "cpu") + (f"; data-parallel on {len(devices)}: {', '.join(devices)}" if len(devices) > 1 else "")
