"""--devices N: data-parallel training (MirroredStrategy) on two logical devices of the CPU, each run in its
own process (TensorFlow splits the CPU only before it starts its devices)."""

import json

from test_train import backed_up_epochs, start, wait_for_epochs

from conftest import call, run
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
    # (3 steps an epoch make later training losses noisy: 1.70 against 0.90 at epoch 3 in one run.)
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    assert abs(one["loss"][0] - history["loss"][0]) < 0.1 * one["loss"][0]
    for a, b in zip(one["val_loss"], history["val_loss"], strict=True):
        assert abs(a - b) < 0.05
    for a, b in zip(one["val_accuracy"], history["val_accuracy"], strict=True):
        assert abs(a - b) <= 1 / 6 + 1e-9  # at most one of the 6 validation photos differs


def test_devices_must_split_the_batch_evenly(small_split, tmp_path):
    uneven = run("train.py", "--data", small_split, "--out", tmp_path, "--batch-size", "15", "--devices", "2")
    assert uneven.returncode == 2 and "must split evenly" in uneven.stderr
