"""The same train.py on Keras's JAX backend: it trains, validates, resumes after kill -9 and saves the .keras
model; the .tflite is written from that file by the TensorFlow backend in a process of its own."""

import json
import os
import subprocess
import sys

from test_train import backed_up_epochs, wait_for_epochs

from conftest import ROOT, run
from utils import LITERT_FILE, MODEL_FILE

JAX = {"KERAS_BACKEND": "jax"}
FLAGS = ["--epochs", "3", "--batch-size", "16", "--image-size", "64"]


def test_jax_backend_trains_resumes_and_saves_both_files(small_split, tmp_path):
    out = tmp_path / "jax"
    args = [sys.executable, str(ROOT / "train.py"), "--data", str(small_split), "--out", str(out), *FLAGS]
    env = {**os.environ, **JAX, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epochs(out, 1, proc, count=backed_up_epochs)
    proc.kill()
    proc.wait()
    resumed = run("train.py", "--data", small_split, "--out", out, *FLAGS, "--resume", env=JAX)
    assert resumed.returncode == 0, resumed.stderr
    assert "Epoch 1/3" not in resumed.stdout and "Epoch 3/3" in resumed.stdout
    history = json.loads((out / "history.json").read_text())
    assert len(history["val_accuracy"]) == 3 and history["elapsed_seconds"] == sorted(history["elapsed_seconds"])
    rates = history["learning_rate"]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == 3  # the optimizer state came back
    # the model trained on JAX loads on TensorFlow, and its LiteRT copy (exported there) agrees with it
    rows = {}
    for name in (MODEL_FILE, LITERT_FILE):
        result = run("predict.py", small_split / "test", "--model", out / name, "--json")
        assert result.returncode == 0, result.stderr
        rows[name] = [json.loads(line)["dog_probability"] for line in result.stdout.splitlines()]
    assert len(rows[MODEL_FILE]) == 6
    assert max(abs(a - b) for a, b in zip(*rows.values(), strict=True)) < 1e-3
    saved = json.loads((out / "test_predictions.json").read_text())  # JAX's own evaluation agrees too
    by_path = {r["path"]: r["probabilities"]["dog"] for r in saved}
    keras_rows = run("predict.py", small_split / "test", "--model", out / MODEL_FILE, "--json").stdout.splitlines()
    for row in map(json.loads, keras_rows):
        assert abs(row["dog_probability"] - by_path[row["path"]]) < 2e-3


def test_jax_data_parallel_on_two_cpu_devices(small_split, tmp_path):
    """--devices 2 on JAX: keras.distribution.DataParallel over two emulated CPU devices (XLA_FLAGS, as a
    multi-GPU machine would give real ones), close to the one-device run on the same batches."""
    histories = {}
    for n in (1, 2):
        env = {**JAX, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        out = tmp_path / f"jax{n}"
        result = run("train.py", "--data", small_split, "--out", out, *FLAGS, "--devices", str(n), env=env)
        assert result.returncode == 0, result.stderr
        assert ("devices cpu:0, cpu:1;" in result.stdout) == (n == 2)
        histories[n] = json.loads((out / "history.json").read_text())
    assert (tmp_path / "jax2" / MODEL_FILE).exists() and (tmp_path / "jax2" / LITERT_FILE).exists()
    assert abs(histories[1]["loss"][0] - histories[2]["loss"][0]) < 0.1 * histories[1]["loss"][0]
    for a, b in zip(histories[1]["val_loss"], histories[2]["val_loss"], strict=True):
        assert abs(a - b) < 0.05
