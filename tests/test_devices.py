"""--devices N: data-parallel training (MirroredStrategy) on two logical devices of the CPU, each run in its
own process (TensorFlow splits the CPU only before it starts its devices)."""

import json
import os
import subprocess
import sys

from test_train import backed_up_epochs, start, wait_for_epochs

from conftest import ROOT, call, run
from utils.config import LITERT_FILE, MODEL_FILE

FLAGS = ["--batch-size", "16", "--image-size", "64", "--ema", "0.9"]


def test_two_devices_train_resume_after_kill_and_export(small_split, tmp_path):
    single = call("train.py", "--data", small_split, "--out", tmp_path / "one", "--epochs", "3", *FLAGS)
    assert single.returncode == 0, single.stderr

    out = tmp_path / "two"
    proc = start(small_split, out, "--epochs", "3", "--ema", "0.9", "--devices", "2")
    wait_for_epochs(out, 1, proc, count=backed_up_epochs)
    proc.kill()
    proc.wait()
    resumed = run(
        "train.py", "--data", small_split, "--out", out, "--epochs", "3", *FLAGS, "--devices", "2", "--resume"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "devices /cpu:0, /cpu:1" in resumed.stdout and "Epoch 1/3" not in resumed.stdout
    assert (out / MODEL_FILE).stat().st_size > 0 and (out / LITERT_FILE).stat().st_size > 0
    history = json.loads((out / "history.json").read_text())
    assert len(history["val_accuracy"]) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert "data-parallel on 2" in metrics["device"] and metrics["recipe"]["ema"] == 0.9
    # the averaged weights were validated and saved: the model predicts, from both files alike
    rows = {}
    for name in (MODEL_FILE, LITERT_FILE):
        result = call("predict.py", small_split / "test", "--model", out / name, "--json")
        assert result.returncode == 0, result.stderr
        rows[name] = [json.loads(line)["dog_probability"] for line in result.stdout.splitlines()]
    assert max(abs(a - b) for a, b in zip(*rows.values(), strict=True)) < 1e-3
    # close to one device on the same data: the same batches, only BatchNorm sees half a batch per device.
    # Its statistics over half a batch move the training loss of the first epoch by up to about a fifth from
    # the identity start (3 steps an epoch make later ones noisier still); a loss summed over the two devices
    # instead of averaged would be twice as large. The validation of the averaged weights must agree closely.
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    assert abs(one["loss"][0] - history["loss"][0]) < 0.4 * one["loss"][0]
    for a, b in zip(one["val_loss"], history["val_loss"], strict=True):
        assert abs(a - b) < 0.05
    for a, b in zip(one["val_accuracy"], history["val_accuracy"], strict=True):
        assert abs(a - b) <= 1 / 6 + 1e-9  # at most one of the 6 validation photos differs


def test_devices_must_split_the_batch_evenly(small_split, tmp_path):
    uneven = run("train.py", "--data", small_split, "--out", tmp_path, "--batch-size", "15", "--devices", "2")
    assert uneven.returncode == 2 and "must split evenly" in uneven.stderr
    derived = run("train.py", "--data", small_split, "--out", tmp_path, "--devices", "3")  # the split's 16
    assert derived.returncode == 2 and "--batch-size 16 must split evenly" in derived.stderr
    assert "(derived); set --batch-size" in derived.stderr and "Traceback" not in derived.stderr


MUON_ON_TWO_DEVICES = """
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from utils.model import compile_model
at = dict(image_size=32, steps=4, width=0.25, bn_momentum=0.9, epochs=2, learning_rate=0.05, warmup_steps=1)
at.update(label_smoothing=0.0, ema=0.0)
one = compile_model(("a", "b"), **at)
start = [w.numpy() for w in one.trainable_variables]
rng = np.random.default_rng(0)
steps = [[rng.normal(size=w.shape).astype("float32") for w in start] for _ in range(3)]
for gradients in steps:
    one.optimizer.apply(gradients, one.trainable_variables)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    two = compile_model(("a", "b"), **at)
    two.optimizer.build(two.trainable_variables)
for w, value in zip(two.trainable_variables, start):
    w.assign(value)
@tf.function
def step(gradients):  # each device holds half of each gradient; the optimizer sums them
    strategy.run(lambda: two.optimizer.apply([g / 2 for g in gradients], two.trainable_variables))
for gradients in steps:
    step([tf.constant(g) for g in gradients])
print(type(two.optimizer).__name__, max(np.abs(a.numpy() - b.numpy()).max() for a, b in zip(one.trainable_variables,
      two.trainable_variables)), max(np.abs(a.numpy() - b).max() for a, b in zip(one.trainable_variables, start)))
"""


def test_the_default_optimizer_takes_the_same_step_on_two_devices_as_on_one():
    """Muon's step for the convolutions is this project's own (utils.model.conv_muon); under MirroredStrategy
    the gradients of the devices are summed and every copy of a weight must move as the one device's does."""
    result = subprocess.run(
        [sys.executable, "-c", MUON_ON_TWO_DEVICES],
        cwd=ROOT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    name, difference, moved = result.stdout.split()[-3:]
    assert name == "ConvMuon" and float(moved) > 0.01, "the default optimizer did not move the weights"
    assert float(difference) < 1e-5, f"two devices moved a weight {difference} away from one device's step"
