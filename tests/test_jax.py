"""The same train.py on Keras's JAX backend: it trains, validates, resumes after kill -9 and saves the .keras
model; the .tflite is written from that file by the TensorFlow backend in a process of its own."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_train import backed_up_epochs, wait_for_epochs

import utils.engine_numpy
import utils.engine_tf
import utils.images
import utils.warps
from conftest import ROOT, call, run
from utils.config import LITERT_FILE, MODEL_FILE

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
        result = call("predict.py", small_split / "test", "--model", out / name, "--json")
        assert result.returncode == 0, result.stderr
        rows[name] = [json.loads(line)["dog_probability"] for line in result.stdout.splitlines()]
    assert len(rows[MODEL_FILE]) == 6
    assert max(abs(a - b) for a, b in zip(*rows.values(), strict=True)) < 1e-3
    saved = json.loads((out / "test_predictions.json").read_text())  # JAX's own evaluation agrees too
    by_path = {r["path"]: r["probabilities"]["dog"] for r in saved}
    keras_rows = call("predict.py", small_split / "test", "--model", out / MODEL_FILE, "--json").stdout.splitlines()
    for row in map(json.loads, keras_rows):
        assert abs(row["dog_probability"] - by_path[row["path"]]) < 2e-3


# The one-device run that the --devices 2 and --processes 2 runs are compared with: the NumPy engine, CutMix
# off (it mixes within a process's share), one image size; XLA_FLAGS gives this process two CPU devices, as a
# multi-GPU machine would give real ones, of which --devices 1 takes one.
ALIKE = [*FLAGS[:-1], "32", "--engine", "numpy", "--cutmix", "0"]
TWO_CPU_DEVICES = {**JAX, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


@pytest.fixture(scope="session")
def one_device(small_split, tmp_path_factory):
    """(stdout, history) of the one-device run, once per worker: its two tests are one xdist_group, and a worker
    may run other modules' tests between them."""
    out = tmp_path_factory.mktemp("jax-one-device")
    result = run("train.py", "--data", small_split, "--out", out, *ALIKE, "--devices", "1", env=TWO_CPU_DEVICES)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads((out / "history.json").read_text())


def assert_trained_alike(one, other):
    """Two histories of the same batches on different hardware: close losses, epoch by epoch."""
    assert abs(one["loss"][0] - other["loss"][0]) < 0.1 * one["loss"][0]
    for a, b in zip(one["val_loss"], other["val_loss"], strict=True):
        assert abs(a - b) < 0.05


@pytest.mark.xdist_group("one_device")
def test_jax_data_parallel_on_two_cpu_devices(small_split, tmp_path, one_device):
    """--devices 2 on JAX: keras.distribution.DataParallel over two CPU devices, close to the one-device run."""
    out = tmp_path / "jax2"
    result = run("train.py", "--data", small_split, "--out", out, *ALIKE, "--devices", "2", env=TWO_CPU_DEVICES)
    assert result.returncode == 0, result.stderr
    assert "devices cpu:0, cpu:1;" in result.stdout and "devices cpu:0, cpu:1;" not in one_device[0]
    assert (out / MODEL_FILE).exists() and (out / LITERT_FILE).exists()
    assert_trained_alike(one_device[1], json.loads((out / "history.json").read_text()))


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_batch_shares_of_processes_make_up_the_whole_batch(small_split):
    """Each process's share of a batch, warped with its share of the batch's draws: put together, the shares
    are the one-process batch, bit for bit, in both engines."""
    from utils.images import list_split, load_split, split_classes

    x, labels, _ = load_split(*list_split(small_split, "train", split_classes(small_split)[1]), 48)
    y = labels.astype("float32")
    sizes = [32, 48]
    whole = utils.warps.batch_plan(len(y), 16, 3, sizes, 0)
    shares = [utils.warps.batch_plan(len(y), 16, 3, sizes, 0, part=(i, 2)) for i in (0, 1)]
    assert np.array_equal(np.concatenate([s.index for s in shares], axis=1), whole.index)  # disjoint halves
    assert all(np.array_equal(s.side, whole.side) and np.array_equal(s.number, whole.number) for s in shares)
    assert [s.start for s in shares] == [0, 8] and whole.share(np.arange(16)).tolist() == list(range(16))

    def numpy_engine(plan):
        data = utils.engine_numpy.array_batches(x, y, None, plan, 1.0)
        return [data[k] for k in range(len(whole.index))]

    def tf_engine(plan):
        return [tuple(t.numpy() for t in b) for b in utils.engine_tf.warped_batches(x, y, None, plan, 1.0)]

    for engine in (numpy_engine, tf_engine):
        one, halves = engine(whole), [engine(s) for s in shares]
        for k, batch in enumerate(one):
            for part in range(2):  # images and targets
                joined = np.concatenate([halves[0][k][part], halves[1][k][part]])
                assert np.array_equal(joined, batch[part]), (engine.__name__, k)


@pytest.mark.xdist_group("one_device")
def test_two_processes_train_one_model_through_jax_distributed(small_split, tmp_path, one_device):
    """--processes 2 on one machine, as on two hosts: the processes meet at --coordinator (jax.distributed;
    gloo carries the CPU's all-reduce), each feeds half of every batch, and they train one model: the same
    losses and predictions in both, and those of the one-device run on the same batches."""
    out = tmp_path / "two"
    flags = [*ALIKE, "--data", str(small_split), "--out", str(out)]
    meet = ["--processes", "2", "--coordinator", f"localhost:{free_port()}"]
    env = {**os.environ, **JAX, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *flags, *meet, "--process-id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]
    outputs = [p.communicate(timeout=400) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr
        assert "devices cpu:0, cpu:2048;" in stdout  # one device each, both in the run
    folders = [out, out / ".process-1"]
    histories = [json.loads((f / "history.json").read_text()) for f in folders]
    assert histories[0]["loss"] == histories[1]["loss"] and histories[0]["val_loss"] == histories[1]["val_loss"]
    predictions = [json.loads((f / "test_predictions.json").read_text()) for f in folders]
    assert predictions[0] == predictions[1]  # one model, not two
    assert (out / LITERT_FILE).exists() and not (folders[1] / LITERT_FILE).exists()

    assert_trained_alike(one_device[1], histories[0])


def test_processes_refused_without_jax_or_coordinator(small_split, tmp_path):
    base = ["--data", small_split, "--out", tmp_path / "x", "--processes", "2"]
    on_tf = call("train.py", *base, "--coordinator", "localhost:1")  # this process runs Keras on TensorFlow
    assert on_tf.returncode == 2 and "KERAS_BACKEND=jax" in on_tf.stderr
    lost = run("train.py", *base, env=JAX)
    assert lost.returncode == 2 and "--coordinator" in lost.stderr
