"""The whole pipeline on real photos, resuming after kill -9 and Ctrl-C, and train.py's refusals."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, call, run
from utils.config import LITERT_FILE, MODEL_FILE
from utils.evaluate import best_epoch
from utils.warps import image_sizes


@pytest.fixture(scope="module")
def data(small_split):
    return small_split


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    result = call("train.py", "--data", data, "--out", out, *TINY, "--tensorboard")
    assert result.returncode == 0, result.stderr
    return out, result


def test_prepare_train_plot_predict_end_to_end(data, trained):
    out, result = trained
    assert "Epoch 1/1" in result.stdout
    report = json.loads((data / "report.json").read_text())
    assert report["splits"]["train"] == {"cats": 24, "dogs": 24} and report["splits"]["test"] == {"cats": 3, "dogs": 3}
    history = json.loads((out / "history.json").read_text())
    for key in ("accuracy", "val_accuracy", "loss", "val_loss"):
        assert len(history[key]) == 1 and 0 <= history[key][0] < 50
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_images"] == 6 and 0 <= metrics["test_accuracy"] <= 1 and metrics["train_seconds"] > 0
    assert not (out / ".run").exists(), "the finished run's working files were left behind"
    assert list((out / "logs").rglob("events.out.tfevents.*")), "--tensorboard wrote no event files"

    plots = call("plot_history.py", out / "history.json")
    assert plots.returncode == 0, plots.stderr
    assert "without heat maps" not in plots.stderr  # the saved model explains its mistakes
    for name in ("accuracy.png", "loss.png", "confusion.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    pred = call("predict.py", data / "test" / "cats", "--model", out / MODEL_FILE, "--json")
    assert pred.returncode == 0, pred.stderr
    rows = [json.loads(line) for line in pred.stdout.splitlines()]
    assert len(rows) == 3 and all(r["label"] in ("cat", "dog") and 0 <= r["dog_probability"] <= 1 for r in rows)
    # train.py's saved test predictions agree with predict.py on the same files
    saved = {r["path"]: r["probabilities"]["dog"] for r in json.loads((out / "test_predictions.json").read_text())}
    for r in rows:
        assert r["dog_probability"] == pytest.approx(saved[r["path"]], abs=2e-3)


def test_litert_copy_agrees_with_the_keras_model_on_real_photos(data, trained):
    """Every real photo of the split gets the same label from both files and a probability within
    0.001; in logits (strict even for a barely trained model near 0.5) within 1e-4."""
    import numpy as np

    from utils.images import list_images, load_image
    from utils.runtime import load_model

    out, _ = trained
    by_model = {}
    for name in (MODEL_FILE, LITERT_FILE):
        result = call("predict.py", data, "--model", out / name, "--json")
        assert result.returncode == 0, result.stderr
        by_model[name] = {r["path"]: r for r in map(json.loads, result.stdout.splitlines())}
    keras_rows, litert_rows = by_model[MODEL_FILE], by_model[LITERT_FILE]
    assert len(keras_rows) == 60 and keras_rows.keys() == litert_rows.keys()
    for path, k in keras_rows.items():
        assert litert_rows[path]["label"] == k["label"], path
        assert litert_rows[path]["dog_probability"] == pytest.approx(k["dog_probability"], abs=1e-3), path

    (keras_run, size, names, _), (litert_run, litert_size, litert_names, _) = (
        load_model(out / n) for n in (MODEL_FILE, LITERT_FILE)
    )
    assert size == litert_size == 64 and names == litert_names == ["cat", "dog"]
    images = np.stack([load_image(p, size) for p in list_images(data)])
    logits = [np.log(p / (1 - p)) for p in (keras_run(images).ravel(), litert_run(images).ravel())]
    assert np.ptp(logits[0]) > 1e-3, "photos must get different outputs for the comparison to mean anything"
    assert np.abs(logits[0] - logits[1]).max() < 1e-4


def start(data, out, *flags):
    args = ["--data", data, "--out", out, "--batch-size", "16", "--image-size", "64", *flags]
    command = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def backed_up_epochs(out):
    meta = out / ".run" / "backup" / "training_metadata.json"
    return json.loads(meta.read_text())["epoch"] if meta.exists() else 0


def logged_epochs(out):
    log = out / ".run" / "log.csv"
    return len(list(csv.DictReader(log.open()))) if log.exists() else 0


def wait_for_epochs(out, n, proc, count=logged_epochs, timeout=240):
    """Block until the run has n finished epochs (logged, or backed up)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if count(out) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"no {n} epochs in {timeout} s")


def test_resume_after_kill_9_keeps_every_epoch_once_and_old_model_intact(data, trained, tmp_path):
    model_dir, _ = trained
    out = tmp_path / "run"
    out.mkdir()
    previous = (model_dir / MODEL_FILE).read_bytes()
    (out / MODEL_FILE).write_bytes(previous)  # a model from an earlier run must survive the crash
    # kill -9 just as epoch 1 is logged (its backup may be mid-write), resume, then kill again
    # once epoch 1 is surely backed up; the second resume must start at epoch 2.
    proc = start(data, out, "--epochs", "3")
    wait_for_epochs(out, 1, proc)
    proc.kill()
    proc.wait()
    assert (out / MODEL_FILE).read_bytes() == previous
    proc = start(data, out, "--epochs", "3", "--resume")
    wait_for_epochs(out, 1, proc, count=backed_up_epochs)
    proc.kill()
    proc.wait()
    assert (out / MODEL_FILE).read_bytes() == previous
    done = backed_up_epochs(out)
    flags = ["--data", data, "--out", out, "--batch-size", "16", "--image-size", "64", "--resume"]
    mismatch = call("train.py", *flags, "--epochs", "4")
    assert mismatch.returncode == 2 and "--epochs 3 (now 4)" in mismatch.stderr
    config = out / ".run" / "config.json"  # a schedule of utils.warps' settings other than today's
    saved = json.loads(config.read_text())
    config.write_text(json.dumps({**saved, "image_sizes": [64, 64, 64]}))
    mismatch = call("train.py", *flags, "--epochs", "3")
    import train

    now = image_sizes(64, 3, train.parse_args([]).progressive)  # the default schedule at these flags
    assert now != [64, 64, 64] and mismatch.returncode == 2
    assert f"image size by epoch [64, 64, 64] (now {now})" in mismatch.stderr
    config.write_text(json.dumps({k: v for k, v in saved.items() if k != "image_sizes"}))  # an older run's
    resumed = call("train.py", *flags, "--epochs", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Epoch {done}/3" not in resumed.stdout and "Epoch 3/3" in resumed.stdout
    history = json.loads((out / "history.json").read_text())
    assert all(len(history[k]) == 3 for k in ("accuracy", "val_accuracy", "loss", "val_loss"))
    assert history["elapsed_seconds"] == sorted(history["elapsed_seconds"])
    # the optimizer state came back: the cosine schedule kept decaying instead of restarting
    rates = history["learning_rate"]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == 3
    assert (out / MODEL_FILE).read_bytes() != previous
    # epochs 1-2 trained at 32 px: only epoch 3 was validated at the size the test runs at
    assert json.loads((out / "metrics.json").read_text())["best_epoch"] == 3


def test_a_backup_cut_short_between_its_two_writes_resumes_from_the_previous_epoch(tmp_path, monkeypatch):
    """kill -9 after an epoch's weights are written but before its metadata: the resumed run gets the
    previous epoch's weights, optimizer step and epoch number, all three from the same save."""
    import numpy as np

    from utils import fit
    from utils.backend import import_keras

    keras = import_keras()

    def tiny():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        model.compile(optimizer="adam", loss="mse")
        return model

    x, y = np.random.default_rng(0).normal(size=(8, 3)), np.zeros((8, 2))
    model, backup = tiny(), fit.backup_class(0)(str(tmp_path), delete_checkpoint=False)
    model.fit(x, y, epochs=1, batch_size=4, callbacks=[backup], verbose=0)  # epoch 1 backed up: 2 steps
    epoch_1 = model.get_weights()

    def killed(path, obj):
        raise SystemExit("killed")

    monkeypatch.setattr(fit, "write_json", killed)
    with pytest.raises(SystemExit):
        model.fit(x, y, epochs=2, batch_size=4, callbacks=[backup], verbose=0)
    assert not np.allclose(model.get_weights()[0], epoch_1[0]), "epoch 2 must have changed the weights"
    resumed = tiny()
    restore = fit.backup_class(0)(str(tmp_path), delete_checkpoint=False)
    restore.set_model(resumed)
    restore.on_train_begin()
    assert resumed._initial_epoch == 1 and int(resumed.optimizer.iterations) == 2
    for now, then in zip(resumed.get_weights(), epoch_1, strict=True):
        np.testing.assert_array_equal(now, then)


def test_best_epoch_is_the_best_at_the_final_size_and_the_later_of_a_tie():
    history = {"val_accuracy": [0.9, 0.85, 0.87, 0.87, 0.86], "image_size": [128, 160, 160, 160, 160]}
    assert best_epoch(history, 160) == 3
    assert best_epoch({k: v[:2] for k, v in history.items()}, 192) == 0  # none at the final size: the best of all


def test_ctrl_c_says_how_to_resume_without_traceback(data, tmp_path):
    out = tmp_path / "run"
    proc = start(data, out, "--epochs", "20")
    wait_for_epochs(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    assert "Traceback" not in stderr
    message = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "--resume" in message[0] and "finished epoch" in message[0]
    assert not (out / MODEL_FILE).exists()


def test_refusals_are_one_line(data, tmp_path):
    # every case names --out: a refused run must not touch anyone's models/
    empty = tmp_path / "data"
    for split in ("train", "val", "test"):
        (empty / split / "cats").mkdir(parents=True)
        (empty / split / "dogs").mkdir(parents=True)
    cases = [
        (["--data", tmp_path / "missing"], "run `python prepare_data.py"),
        (["--data", empty], "has no images"),
        (["--data", data, "--batch-size", "500"], "fewer than --batch-size 500"),
        (["--data", data, "--out", tmp_path / "fresh", "--resume"], "nothing to resume"),
    ]
    unfinished = tmp_path / "out" / ".run" / "config.json"  # an interrupted run, waiting for --resume
    unfinished.parent.mkdir(parents=True)
    unfinished.write_text("{}")
    for flags, message in cases:
        result = call("train.py", "--out", tmp_path / "out", *flags)
        assert result.returncode == 2, (flags, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert unfinished.exists(), "a refused run deleted the unfinished run"


def test_imagedatagenerator_engine_trains_and_saves(data, tmp_path):
    out = tmp_path / "idg"
    result = run("train.py", "--data", data, "--out", out, *TINY, "--engine", "idg", "--progressive", "0")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["engine"] == "idg" and metrics["test_images"] == 6
    assert (out / MODEL_FILE).stat().st_size > 0 and (out / LITERT_FILE).stat().st_size > 0
    refused = run("train.py", "--data", data, "--out", out, *TINY, "--engine", "idg")
    assert refused.returncode == 2 and "--progressive 0" in refused.stderr and "Traceback" not in refused.stderr
