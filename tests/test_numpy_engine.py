"""--engine numpy: the tf.data engine's batches made by NumPy and PIL in a keras.utils.PyDataset, so that
train.py runs on the JAX backend where TensorFlow is not installed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import backed_up_epochs, wait_for_epochs

import utils.backend
import utils.engine_numpy
import utils.engine_tf
import utils.images
import utils.warps
from conftest import ROOT, call, run
from utils.config import MODEL_FILE
from utils.images import DiskImages, list_split, load_split, split_classes


@pytest.fixture(scope="module")
def photos(small_split):
    images, _, _ = load_split(*list_split(small_split, "train", split_classes(small_split)[1]), 96)
    return images  # 48 real photos, uint8


@pytest.fixture(scope="module")
def without_tensorflow(tmp_path_factory):
    """Variables under which Python finds every installed package but TensorFlow: a folder of links to the
    packages beside Keras (TensorFlow's left out) takes the place of that folder on sys.path."""
    import keras

    site = Path(keras.__file__).resolve().parent.parent
    root = tmp_path_factory.mktemp("no-tensorflow")
    view, hook = root / "site-packages", root / "hook"
    view.mkdir()
    hook.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith("tensorflow"):
            (view / entry.name).symlink_to(entry)
    (hook / "sitecustomize.py").write_text(
        f"import sys\nsys.path = [p for p in sys.path if p != {str(site)!r}] + [{str(view)!r}]\n"
    )
    env = {"PYTHONPATH": str(hook)}
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u; print(u.find_spec('tensorflow'), bool(u.find_spec('jax')))",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert check.stdout.split() == ["None", "True"], check.stdout + check.stderr
    return env


def test_numpy_warp_is_tensorflows_warp(photos):
    """The same transforms give the same pixels as ImageProjectiveTransformV3 (bilinear, edges repeated),
    strong warps included, whose corners read far outside the image."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    for strength in (1.0, 3.0):
        transforms = utils.engine_numpy.random_transforms(rng, len(photos), photos.shape[1], strength)
        mine = utils.engine_numpy.warp_arrays(photos, transforms)
        theirs = tf.raw_ops.ImageProjectiveTransformV3(
            images=tf.cast(photos, "float32"),
            transforms=transforms,
            output_shape=photos.shape[1:3],
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="NEAREST",
        ).numpy()
        assert mine.shape == theirs.shape and mine.dtype == np.float32
        assert np.abs(mine - theirs).max() < 1e-3
        assert np.mean(np.abs(mine - photos)) > 10  # and they did move pixels


def test_numpy_draws_mirror_half_the_images_and_follow_their_seed(photos):
    n, side = len(photos), photos.shape[1]
    with pytest.MonkeyPatch.context() as m:
        m.setitem(utils.warps.AUGMENTATION, "rotation", 0.0)
        m.setitem(utils.warps.AUGMENTATION, "zoom", 0.0)
        m.setitem(utils.warps.AUGMENTATION, "translation", 0.0)
        out = utils.engine_numpy.warp_arrays(
            photos, utils.engine_numpy.random_transforms(np.random.default_rng(5), n, side)
        )
    same = [np.array_equal(o, p) for o, p in zip(out, photos, strict=True)]
    mirrored = [np.array_equal(o, p[:, ::-1]) for o, p in zip(out, photos, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 10 < sum(mirrored) < 38, f"{sum(mirrored)} of 48 mirrored: the coin is not fair"
    a, b, c = (utils.engine_numpy.random_transforms(np.random.default_rng(s), n, side) for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_pil_resize_matches_tensorflows_antialiased_resize(photos):
    for size in (48, 64):
        mine, theirs = utils.engine_numpy.resize_array(photos, size), utils.engine_tf.resize(photos, size).numpy()
        assert mine.shape == theirs.shape == (len(photos), size, size, 3)
        diff = np.abs(mine - theirs)
        assert diff.max() <= 1.5 and diff.mean() < 0.5  # rounding to whole levels, nothing more


def test_numpy_cutmix_pastes_one_box_and_mixes_targets_by_its_area(photos):
    x = photos.astype("float32")
    n = len(x)
    y = np.eye(3, dtype="float32")[np.arange(n) % 3]
    w = np.ones(n, dtype="float32")
    same = utils.engine_numpy.cutmix_arrays(x, y, w, np.random.default_rng(0), 0.0)
    assert np.array_equal(same[0], x) and np.array_equal(same[1], y), "share 0 changed a batch"
    areas = []
    for k in range(6):
        mixed, t, weight = utils.engine_numpy.cutmix_arrays(x, y, w, np.random.default_rng([k, 9]), 1.0)
        changed = np.any(mixed != x, axis=-1)
        rows, cols = np.nonzero(changed.any(axis=0))
        box = np.zeros(changed.shape[1:], bool)
        if len(rows):
            box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert not np.any(changed & ~box), "pixels changed outside one box"
        areas.append(box.mean())
        assert np.allclose(t.sum(axis=1), 1) and np.all(t.max(axis=1) >= 1 - box.mean() - 0.02)
        assert np.allclose(weight, 1)
    assert len(set(np.round(areas, 3))) > 3, "the box does not change from batch to batch"


def test_numpy_batches_follow_the_plan_resume_and_stream_alike(photos, small_split, tmp_path):
    y = np.arange(len(photos), dtype="float32")  # each target names its photo
    sizes = [64, 64, 96]

    def batches(x, first_epoch, mix=0.0):
        plan = utils.warps.batch_plan(len(y), 16, 7, sizes, first_epoch)
        data = utils.engine_numpy.array_batches(x, y, None, plan, 1.0, mix, workers=2)
        assert data.num_batches is None  # endless to Keras: item k is batch k of the run
        return [data[k] for k in range(3 * (len(sizes) - first_epoch))]

    run_all = batches(photos, 0)
    assert len(run_all) == 3 * 3  # 48 photos, 16 a batch, 3 epochs
    assert [b[0].shape[1] for b in run_all] == [64] * 6 + [96] * 3
    for epoch in range(3):  # each epoch shows each photo once, in a new order
        targets = np.concatenate([b[1] for b in run_all[3 * epoch : 3 * epoch + 3]])
        assert sorted(targets) == list(range(48))
    assert not np.array_equal(run_all[0][1], run_all[3][1])
    again = batches(photos, 0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(run_all, again, strict=True))
    resumed = batches(photos, 1)  # a run resumed after its first epoch sees what the whole run saw
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(run_all[3:], resumed, strict=True))
    cache = tmp_path / "train.u8"
    cache.write_bytes(photos.tobytes())
    streamed = batches(DiskImages(cache, len(photos), photos.shape[1]), 0)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(run_all, streamed, strict=True))


FIT_WALK = """
import json
import numpy as np
from utils.backend import import_keras
from utils.engine_numpy import array_batches
from utils.warps import batch_plan
keras = import_keras()
photos = np.random.default_rng(0).integers(0, 255, (48, 40, 40, 3), dtype=np.uint8)
data = array_batches(photos, np.arange(48, dtype="float32"), None, batch_plan(48, 16, 7, [32, 32, 40], 1), 1.0)
calls, getitem = [], type(data).__getitem__
type(data).__getitem__ = lambda self, k: calls.append(k) or getitem(self, k)
inputs = keras.Input((None, None, 3))
model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(inputs)))
model.compile("sgd", "mse")
model.fit(data, epochs=2, steps_per_epoch=3, shuffle=False, verbose=0)
print(json.dumps(calls))
"""


def test_keras_fit_walks_the_numpy_batches_in_order_across_epochs():
    """Through Keras's own fit on JAX, a run resumed after its first epoch (two epochs of three batches left)
    trains on items 0 to 5 in order: Keras may read a batch to build the model and start over, and reads at
    most two past the end, but never restarts at an epoch's start (which would replay the first epoch)."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", FIT_WALK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    calls = json.loads(result.stdout.splitlines()[-1])
    last_start = len(calls) - 1 - calls[::-1].index(0)
    walk = calls[last_start:]
    assert walk[:6] == [0, 1, 2, 3, 4, 5] and len(walk) <= 8, calls


def test_numpy_engine_is_refused_on_tensorflow(small_split, tmp_path):
    refused = run(
        "train.py", "--data", small_split, "--out", tmp_path, "--engine", "numpy", env={"KERAS_BACKEND": "tensorflow"}
    )
    assert refused.returncode == 2 and "--engine numpy feeds the JAX backend" in refused.stderr


def test_jax_trains_resumes_and_predicts_where_tensorflow_is_not_installed(small_split, tmp_path, without_tensorflow):
    """No TensorFlow: train.py picks the JAX backend and the NumPy engine by itself, resumes after kill -9,
    saves the .keras (the .tflite cannot be written there and the run says how), and predict.py reads it.
    Where TensorFlow is installed, --export then writes a .tflite that agrees with it."""
    out = tmp_path / "no-tf"
    flags = ["--data", str(small_split), "--out", str(out), "--epochs", "3", "--batch-size", "16", "--image-size", "64"]
    env = {**os.environ, **without_tensorflow, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    args = [sys.executable, str(ROOT / "train.py"), *flags]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_epochs(out, 1, proc, count=backed_up_epochs)
    proc.kill()
    proc.wait()
    resumed = subprocess.run([*args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "Keras runs on JAX" in resumed.stderr and "Epoch 1/3" not in resumed.stdout
    assert "LiteRT copy is not (TensorFlow, which LiteRT's converter needs, is not installed here)" in resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["engine"] == "numpy" and metrics["epochs"] == 3
    assert (out / MODEL_FILE).exists() and not (out / MODEL_FILE).with_suffix(".tflite").exists()
    history = json.loads((out / "history.json").read_text())
    rates = history["learning_rate"]
    assert rates == sorted(rates, reverse=True) and len(set(rates)) == 3  # the schedule went on after the kill
    refused = subprocess.run(
        [*args, "--engine", "layers"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "--engine layers needs TensorFlow" in refused.stderr

    predicted = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), str(small_split / "test"), "--model", str(out), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert predicted.returncode == 0, predicted.stderr
    on_jax = {r["path"]: r["dog_probability"] for r in map(json.loads, predicted.stdout.splitlines())}
    assert len(on_jax) == 6
    saved = {r["path"]: r["probabilities"]["dog"] for r in json.loads((out / "test_predictions.json").read_text())}
    assert all(abs(on_jax[p] - saved[p]) < 2e-3 for p in on_jax)

    exported = call("train.py", "--export", out / MODEL_FILE)  # where TensorFlow is installed
    assert exported.returncode == 0, exported.stderr
    litert = call("predict.py", small_split / "test", "--model", (out / MODEL_FILE).with_suffix(".tflite"), "--json")
    assert litert.returncode == 0, litert.stderr
    for row in map(json.loads, litert.stdout.splitlines()):
        assert abs(row["dog_probability"] - on_jax[row["path"]]) < 1e-3
