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


def test_jax_devices_on_a_cpu_are_refused_in_one_line(small_split, tmp_path):
    result = run("train.py", "--data", small_split, "--out", tmp_path, *FLAGS, "--devices", "2", env=JAX)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "use the TensorFlow backend" in result.stderr
