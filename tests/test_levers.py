"""The speedrun's measuring tools: benchmarks/levers.py sets each lever as train.py will read it, and
benchmarks/tta_views.py shifts photos by whole pixels, filling the edge by reflection."""

import importlib
import sys

import numpy as np
import pytest

from conftest import ROOT, flower_photos

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_every_lever_is_train_py_flags_or_a_utils_setting_it_reads(monkeypatch):
    import levers

    import train
    import utils.warps

    for name, (flags, settings) in levers.LEVERS.items():
        train.parse_args(["--data", "x", *flags])  # exits on a flag train.py does not have
        for setting in settings:
            assert setting.startswith("utils."), f"{name}: {setting} is not a setting of utils"
            target, _, key = setting.rstrip("]").partition("[")
            module, attribute = target.rsplit(".", 1)
            value = getattr(importlib.import_module(module), attribute)  # raises on a setting utils lacks
            assert not key or key in value, f"{name}: {setting} names a key {target} does not have"
    monkeypatch.setitem(utils.warps.AUGMENTATION, "horizontal_flip", True)
    levers.apply("utils.warps.AUGMENTATION[horizontal_flip]", "alternate")
    assert utils.warps.AUGMENTATION["horizontal_flip"] == "alternate"
    monkeypatch.setattr(utils.warps, "AUGMENTATION", utils.warps.AUGMENTATION)
    levers.apply("utils.warps.AUGMENTATION", {"horizontal_flip": False})
    assert utils.warps.AUGMENTATION == {"horizontal_flip": False}


def test_the_default_is_muon_from_the_identity_and_the_optimizer_levers_compile_rmsprop_and_sgd(monkeypatch):
    import levers

    import utils.model

    monkeypatch.setattr(utils.model, "OPTIMIZER", dict(utils.model.OPTIMIZER))
    monkeypatch.setattr(utils.model, "DIRAC_INIT", utils.model.DIRAC_INIT)
    compile_at = dict(image_size=32, steps=4, width=0.25, bn_momentum=0.9, epochs=2, learning_rate=0.05)
    compile_at.update(warmup_steps=2, label_smoothing=0.0, ema=0.99)
    default = utils.model.compile_model(("a", "b"), **compile_at)
    kernel = default.get_layer("block1_conv1").get_weights()[0]  # 8 filters at width 0.25
    assert np.array_equal(kernel[1, 1, :8], np.eye(8)), "the default does not start the blocks as the identity"
    for setting, value in levers.LEVERS["rmsprop"][1].items():
        levers.apply(setting, value)
    rmsprop = utils.model.compile_model(("a", "b"), **compile_at)
    assert type(rmsprop.optimizer).__name__ == "RMSprop"
    assert not np.array_equal(rmsprop.get_layer("block1_conv1").get_weights()[0][1, 1, :8], np.eye(8))
    levers.apply("utils.model.OPTIMIZER[name]", "sgd-nesterov")
    optimizer = utils.model.compile_model(("a", "b"), **compile_at).optimizer
    assert type(optimizer).__name__ == "SGD" and optimizer.nesterov and optimizer.momentum == 0.9
    assert optimizer.weight_decay == utils.model.OPTIMIZER["weight_decay"] and optimizer.use_ema
    levers.apply("utils.model.OPTIMIZER[name]", "sgd-nestorov")  # a misspelt name is not RMSprop in disguise
    with pytest.raises(ValueError, match="no optimizer named 'sgd-nestorov'"):
        utils.model.compile_model(("a", "b"), **compile_at)
    model = default  # Muon, the default
    model.optimizer.build(model.trainable_variables)
    muon_step = [w.path for w in model.trainable_variables if not model.optimizer._should_use_adamw(w)]
    kernels = [w.path for w in model.trainable_variables if w.path.endswith("/kernel")]
    assert muon_step == kernels and len(kernels) == 10, "Muon's step is not on the 9 convolutions and the classifier"
    before = [np.array(w) for w in model.trainable_variables]
    rng = np.random.default_rng(0)
    for _ in range(2):  # the warm-up's first step has a rate of 0
        gradients = [rng.normal(size=w.shape).astype("float32") for w in model.trainable_variables]
        model.optimizer.apply(gradients, model.trainable_variables)  # Muon's step on 4-D kernels
    moved = [not np.array_equal(np.array(w), b) for w, b in zip(model.trainable_variables, before, strict=True)]
    assert set(kernels) <= {w.path for w, m in zip(model.trainable_variables, moved, strict=True) if m}


def test_the_whitening_stem_decorrelates_real_photos_patches_and_stays_frozen_while_the_rest_trains(flowers_zip):
    import io

    import keras
    from PIL import Image

    import utils.model

    jpegs = [j for photos in flower_photos(flowers_zip, 3).values() for j in photos]
    images = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB").resize((33, 33))) for j in jpegs])
    kernel, half = utils.model.whitening_kernel(images), utils.model.STEM // 2
    assert kernel.shape == (3, 3, 3, 2 * half) and np.array_equal(kernel[..., half:], -kernel[..., :half])
    # the stem's convolution of the photos: its first half of channels are uncorrelated, each of variance below
    # 1 and falling (lambda / (lambda + eps) for the largest eigenvalues lambda of the patches' second moment)
    conv = keras.layers.Conv2D(2 * half, 3, strides=2, use_bias=False)
    conv.build((None, 33, 33, 3))
    conv.set_weights([kernel])
    out = np.asarray(conv(images.astype("float32") / 255)).reshape(-1, 2 * half)[:, :half]
    moment = out.T @ out / len(out)
    assert np.abs(moment - np.diag(np.diag(moment))).max() < 1e-3, "the channels are correlated: patches misread"
    assert 0.5 < np.diag(moment)[0] < 1 and np.all(np.diff(np.diag(moment)) <= 1e-6)

    compile_at = dict(image_size=32, steps=2, width=0.25, bn_momentum=0.9, epochs=1, learning_rate=0.05)
    compile_at.update(warmup_steps=1, label_smoothing=0.0, ema=0.0)
    model = utils.model.compile_model(("a", "b", "c"), **compile_at, stem_filters=kernel)
    before = {name: model.get_layer(name).get_weights()[0] for name in ("stem_conv", "block1_conv1")}
    labels = keras.utils.to_categorical(np.arange(len(images)) % 3, 3)
    model.fit(images[:, :32, :32].astype("float32"), labels, batch_size=5, epochs=1, verbose=0)
    assert np.array_equal(model.get_layer("stem_conv").get_weights()[0], kernel), "the whitening stem trained"
    assert not np.array_equal(model.get_layer("block1_conv1").get_weights()[0], before["block1_conv1"])


def test_a_finished_lever_run_is_read_only_while_the_lever_means_what_it_meant(tmp_path):
    import json

    import levers

    run = tmp_path / "flowers" / "default"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5}))
    (run / "lever.json").write_text(json.dumps(levers.LEVERS["default"]))
    assert levers.run_lever("default", [], tmp_path / "flowers", run, 42) == {"test_accuracy": 0.5}
    (run / "lever.json").write_text(json.dumps(levers.LEVERS["rmsprop"]))  # the default of an earlier version
    with pytest.raises(SystemExit, match="another definition of 'default'"):
        levers.run_lever("default", [], tmp_path / "flowers", run, 42)


def test_dirac_init_passes_the_first_channels_through_each_block_convolution():
    from utils.model import build_model, dirac_init

    model = build_model(32, ("a", "b"), widths=(8, 16, 16, 16))
    dirac_init(model)
    conv = model.get_layer("block2_conv1")  # 8 channels in, 16 filters out
    images = np.random.default_rng(0).normal(size=(1, 4, 4, 8)).astype("float32")
    out = np.asarray(conv(images))
    assert np.allclose(out[..., :8], images, atol=1e-6), "the first 8 filters are not the identity"
    assert not np.allclose(out[..., 8:], 0), "the other filters lost their random start"
    stem = model.get_layer("stem_conv").get_weights()[0]
    assert np.count_nonzero(stem) == stem.size, "the stem is not a block convolution"


def test_the_layout_levers_reach_the_model_train_py_builds_and_the_whitened_stem(monkeypatch):
    import levers

    import utils.model

    for setting, value in levers.LEVERS["wide-stem"][1].items():
        monkeypatch.setattr(utils.model, setting.rsplit(".", 1)[1], value)  # as levers.apply sets it
    model = utils.model.build_model(32, ("a", "b"), widths=utils.model.widths(0.5))  # as train.py builds it
    filters = [model.get_layer(name).filters for name in ("stem_conv", "block1_conv1", "block2_conv1", "block4_conv2")]
    assert filters == [32, 16, 32, 128], "a layout lever set in utils.model does not reach the model"
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    assert utils.model.whitening_kernel(images).shape == (3, 3, 3, 32)


def test_stochastic_depth_drops_the_second_branch_of_whole_photos_in_training_only(monkeypatch):
    import levers

    import utils.model

    for setting, value in levers.LEVERS["residual-drop-path-0.1"][1].items():
        monkeypatch.setattr(utils.model, setting.rsplit(".", 1)[1], value)
    monkeypatch.setattr(utils.model, "DROP_PATH", 0.5)  # half the photos, so both outcomes show in 64
    keras = utils.model.import_keras()
    keras.utils.set_random_seed(0)
    model = utils.model.build_model(32, ("a", "b"), widths=(8, 8, 8, 8), stem=8)
    branch, dropped = (model.get_layer(f"block2_{name}").output for name in ("relu2", "drop_path"))
    assert model.get_layer("block2_add").input[1] is dropped, "the dropped branch should be what the skip adds"
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype("float32")
    x, kept = (np.asarray(t) for t in keras.Model(model.input, [branch, dropped])(images, training=True))
    zero = ~kept.reshape(64, -1).any(axis=1)  # photos whose whole branch was dropped
    assert 10 < zero.sum() < 54, f"{zero.sum()} of 64 photos dropped at a rate of 0.5"
    assert np.allclose(kept[~zero], x[~zero] / 0.5, rtol=1e-5), "a kept branch is scaled by 1 / (1 - rate)"
    x, kept = (np.asarray(t) for t in keras.Model(model.input, [branch, dropped])(images, training=False))
    assert np.array_equal(kept, x), "at inference nothing is dropped"


@pytest.mark.parametrize("policy, tolerance", [("float32", 1e-4), ("mixed_bfloat16", 0.05)])
def test_the_fused_batch_norm_trains_as_keras_does_and_the_lever_brings_keras_back(policy, tolerance, monkeypatch):
    import tensorflow as tf

    import utils.model

    keras = utils.model.import_keras()
    rng = np.random.default_rng(0)
    x = tf.cast(rng.normal(2.0, 3.0, size=(2, 4, 4, 3)), policy.removeprefix("mixed_"))  # 32 values a channel
    r = tf.constant(rng.normal(size=(2, 4, 4, 3)), "float32")  # a loss whose gradient reaches every input
    weights = [np.array([0.5, 1.0, 2.0]), np.array([0.1, -0.2, 0.3]), np.zeros(3), np.ones(3)]
    layers, results = (utils.model.fused_batch_norm(), keras.layers.BatchNormalization), []
    for kind in layers:
        layer = kind(momentum=0.9, dtype=policy)
        layer.build(x.shape)
        layer.set_weights(weights)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, "float32") * r)
        gradients = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *gradients, *layer.get_weights()[2:], layer(x, training=False)])
    names = ("output", "input gradient", "gamma gradient", "beta gradient", "moving mean", "moving variance")
    for name, fused, plain in zip((*names, "inference"), *results, strict=True):
        fused, plain = (np.asarray(tf.cast(t, "float32")) for t in (fused, plain))
        assert np.allclose(fused, plain, rtol=tolerance, atol=tolerance), f"{name}: fused {fused} != Keras {plain}"
    assert np.allclose(results[0][5], results[1][5], rtol=1e-5), "the moving variance is Bessel-corrected"
    assert layers[0] is not layers[1], "on TensorFlow the training model should use the fused kernel"
    compile_at = dict(image_size=32, steps=4, width=0.25, bn_momentum=0.9, epochs=2, learning_rate=0.05)
    compile_at.update(warmup_steps=2, label_smoothing=0.0, ema=0.99)
    assert isinstance(utils.model.compile_model(("a", "b"), **compile_at).get_layer("block1_bn1"), layers[0])
    import levers

    monkeypatch.setattr(utils.model, "FUSED_BATCH_NORM", utils.model.FUSED_BATCH_NORM)
    for setting, value in levers.LEVERS["keras-batch-norm"][1].items():
        levers.apply(setting, value)
    assert type(utils.model.compile_model(("a", "b"), **compile_at).get_layer("block1_bn1")) is layers[1]
    assert type(utils.model.build_model(32).get_layer("block1_bn1")) is layers[1], "saved models need no new layer"


@pytest.mark.parametrize("d", [3, -3])
def test_tta_views_shift_by_whole_pixels_and_reflect_the_edge(d):
    from tta_views import shifted

    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    moved = shifted(images, d)
    assert moved.shape == images.shape
    inner = slice(None, -3) if d > 0 else slice(3, None)  # pixel (r, c) shows (r + d, c + d)
    source = slice(3, None) if d > 0 else slice(None, -3)
    assert np.array_equal(moved[:, inner, inner], images[:, source, source])
    # one row past the edge shows the row before the edge (numpy's "reflect")
    if d > 0:
        assert np.array_equal(moved[:, 13, :13], images[:, 14, 3:])
    else:
        assert np.array_equal(moved[:, 2, 3:], images[:, 1, :13])


def fake_train(folder, vals, then):
    """A train.py in `folder` that prints and logs an epoch for each of `vals` as train.py does, then runs `then`."""
    (folder / "train.py").write_text(
        "import sys, time\nfrom pathlib import Path\n"
        "log = Path(sys.argv[sys.argv.index('--out') + 1]) / '.run' / 'log.csv'\n"
        "log.parent.mkdir(parents=True)\nlog.write_text('epoch,val_accuracy\\n')\n"
        f"for epoch, val in enumerate({vals!r}):\n"
        "    with open(log, 'a') as f:\n        f.write(f'{epoch},{val!r}\\n')\n"
        "    print(f'Epoch {epoch + 1}/30', flush=True)\n"
        "    print(f'287/287 - 1s - val_accuracy: {val:.4f} - val_loss: 0.1', flush=True)\n"
        f"{then}\n"
    )


def test_time_to_counts_the_exact_accuracy_not_the_rounded_progress_line(tmp_path, monkeypatch):
    """2,206 of 2,298 photos is 95.997 %, which Keras prints as 0.9600: not yet 96 %."""
    import time_to

    fake_train(tmp_path, [2206 / 2298, 2225 / 2298], then="time.sleep(60)")  # waits for Ctrl-C
    monkeypatch.setattr(time_to, "ROOT", tmp_path)
    seconds, epoch = time_to.default_to(0.96, tmp_path / "data", tmp_path / "run", limit=60)
    assert epoch == 2 and seconds < 30
    runs = time_to.runs_to_time(False, ["--batch-size 32"], ["wide-stem", "wide-stem --seed 7"])
    assert runs == [
        ("--batch-size 32", ["--batch-size", "32"], None),
        ("wide-stem", [], "wide-stem"),
        ("wide-stem --seed 7", ["--seed", "7"], "wide-stem"),  # the lever's run at another seed
    ]


def test_time_to_full_times_each_target_on_the_way_and_reads_the_test_line(tmp_path, monkeypatch):
    """--full lets the run end: the first epoch at each target (exact, not rounded), and the test accuracy."""
    import time_to

    vals = [2000 / 2298, 2100 / 2298, 2206 / 2298, 2207 / 2298, 2150 / 2298]  # 87.0, 91.4, 95.997, 96.04, 93.6 %
    fake_train(tmp_path, vals, then="print('test accuracy 0.9717 on 2298 images (best epoch 4)')")
    monkeypatch.setattr(time_to, "ROOT", tmp_path)
    reached, seconds, test = time_to.whole_run([0.90, 0.96, 0.99], tmp_path / "data", tmp_path / "run")
    assert {t: epoch for t, (_, epoch) in reached.items()} == {0.90: 2, 0.96: 4}
    assert reached[0.90][0] <= reached[0.96][0] <= seconds < 30
    assert test == "test accuracy 0.9717 on 2298 images (best epoch 4)"


def test_a_lever_run_gives_train_py_the_lever_flags_and_settings_then_the_callers_flags(monkeypatch):
    import runpy

    import levers

    import utils.warps

    seen = {}

    def fake_train(path, run_name):
        seen.update(argv=sys.argv[1:], step=utils.warps.SIZE_STEP, power=utils.warps.PHASE_POWER)

    monkeypatch.setattr(runpy, "run_path", fake_train)
    monkeypatch.setattr(utils.warps, "SIZE_STEP", utils.warps.SIZE_STEP)
    monkeypatch.setattr(utils.warps, "PHASE_POWER", utils.warps.PHASE_POWER)
    argv = ["levers.py", "--train", "earlier-schedule", "--", "--out", "o", "--epochs", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    levers.main()
    assert seen == {
        "argv": ["--progressive", "0.7", "--out", "o", "--epochs", "3"],
        "step": 32,
        "power": 0,
    }
    import train

    assert train.parse_args(seen["argv"]).epochs == 3, "the caller's flags must win over the lever's"
