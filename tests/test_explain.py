"""Heat maps (predict.py --explain, mistakes.png): right by gradients, the same from both model files,
pointing at the animal on real photos, and drawn for users."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, call
from utils.config import LITERT_FILE, MODEL_FILE
from utils.images import list_images, load_image

SHIPPED = ROOT / "models"
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT / "benchmarks"))


def layercam_by_gradients(model, images, output):
    """LayerCAM the textbook way: the gradient of one class's score (its logit; a sigmoid unit's first class
    scores minus the logit) at the last block's input, its positive part weighting that input's maps place
    by place."""
    import tensorflow as tf

    from utils.backend import import_keras

    keras = import_keras()

    dense = model.layers[-2]
    layer = [layer.name for layer in model.layers if layer.name.endswith("_pool")][-2]
    features = model.get_layer(layer).output
    front, back = keras.Model(model.input, features), keras.Model(features, dense.input)  # either side of A
    features = front(tf.constant(images, tf.float32), training=False)
    with tf.GradientTape() as tape:
        tape.watch(features)
        logits = tf.matmul(back(features, training=False), dense.kernel) + dense.bias
        score = logits[:, output] if logits.shape[1] > 1 else (2 * output - 1) * logits[:, 0]
    gradient = tf.nn.relu(tape.gradient(score, features))
    return tf.reduce_sum(gradient * features, axis=-1).numpy()


@pytest.mark.parametrize(("size", "classes", "residual"), [(64, 2, False), (120, 5, False), (64, 2, True)])
def test_closed_form_maps_equal_layercam_by_gradients(size, classes, residual, monkeypatch):
    """The maps inside both model files are LayerCAM of each photo's predicted class exactly, for a sigmoid
    and a softmax head, for a size whose last block has an odd side (120 px: 7 x 7, whose last row and
    column the pool drops), and for blocks with a skip around their second convolution (utils.model.RESIDUAL)."""
    from utils.backend import import_keras
    from utils.explain import explaining_model
    from utils.model import build_model

    monkeypatch.setattr("utils.model.RESIDUAL", residual)
    import_keras().utils.set_random_seed(size)  # the same weights every run: a failure can be run again
    rng = np.random.default_rng(size)
    model = build_model(size, [f"class {i}" for i in range(classes)], widths=(8, 16, 16, 32), stem=8)
    assert any(layer.name.endswith("_add") for layer in model.layers) == residual
    for layer in model.layers:  # BatchNorm with statistics of its own, so its scale is part of the check
        if "_bn" in layer.name:
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 2, gamma.shape), rng.normal(0, 0.3, beta.shape), mean, var * 3])
    images = rng.integers(0, 256, (6, size, size, 3)).astype("float32") * rng.uniform(0, 1, (6, 1, 1, 3))
    dense = model.layers[-2]  # biases that split the photos between two classes at their median
    out = np.log(np.asarray(model(images, training=False), dtype="float64"))
    margin = out[:, 0] - np.log1p(-np.exp(out[:, 0])) if classes == 2 else out[:, 1] - out[:, 0]
    bias = np.full(dense.bias.shape, -50.0) if classes > 2 else np.zeros(dense.bias.shape)
    bias[:2] = (0, -np.median(margin)) if classes > 2 else -np.median(margin)
    dense.bias.assign(bias)
    probs, maps = (np.asarray(t) for t in explaining_model(model)(images, training=False))
    assert maps.shape == (6, (size // 16), (size // 16), classes)
    assert np.allclose(probs, np.asarray(model(images, training=False)), atol=1e-6)
    top = np.argmax(np.concatenate([1 - probs, probs], axis=1) if classes == 2 else probs, axis=1)
    assert len(set(top)) > 1, "the photos should not all pick one class: each photo's own class is the check"
    for i, label in enumerate(top):  # the predicted class's map; the others are zeros
        expected = layercam_by_gradients(model, images[i : i + 1], label)[0]
        assert np.abs(expected).max() > 1e-6, "a map of zeros would agree with anything"
        assert np.abs(maps[i, ..., label] - expected).max() <= 1e-4 * np.abs(expected).max()
        assert not np.delete(maps[i], label, axis=-1).any()


def test_two_tied_classes_get_one_map_the_first_as_argmax_labels_it_in_both_files(tmp_path):
    """Two classes with the same weights tie in every photo: the map is the first one's, the class np.argmax
    names, not the sum of both, in the model and in its LiteRT file (which must stay built-in ops only)."""
    from utils.backend import import_keras
    from utils.explain import explaining_model
    from utils.export import export_litert
    from utils.model import build_model
    from utils.runtime import load_model

    import_keras().utils.set_random_seed(0)
    model = build_model(64, ["a", "b", "c"], widths=(8, 16, 16, 32), stem=8)
    dense = model.layers[-2]
    kernel = np.asarray(dense.kernel)
    dense.kernel.assign(np.concatenate([kernel[:, :1], kernel[:, :1], kernel[:, 2:]], axis=1))  # b is a again
    dense.bias.assign(np.array([0.0, 0.0, -50.0], "float32"))
    images = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3)).astype("uint8")
    probs, maps = (np.asarray(t) for t in explaining_model(model)(images.astype("float32"), training=False))
    assert np.array_equal(probs[:, 0], probs[:, 1]) and (np.argmax(probs, axis=1) == 0).all()
    for i in range(len(images)):
        expected = layercam_by_gradients(model, images[i : i + 1].astype("float32"), 0)[0]
        assert np.abs(expected).max() > 1e-6, "a map of zeros would agree with anything"
        assert np.abs(maps[i, ..., 0] - expected).max() <= 1e-4 * np.abs(expected).max()
        assert not maps[i, ..., 1:].any(), "a tied class got a map too"
    export_litert(model, tmp_path / "tied.tflite")
    _, lite = load_model(tmp_path / "tied.tflite", explain=True).explain(images)
    lite = np.asarray(lite)
    assert not lite[..., 1:].any() and np.abs(lite[..., 0] - maps[..., 0]).max() <= 1e-4 * np.abs(maps).max()


@pytest.fixture(scope="module")
def shipped():
    from utils.runtime import load_model

    return {name: load_model(SHIPPED / name, explain=True) for name in (MODEL_FILE, LITERT_FILE)}


def test_keras_and_litert_give_the_same_maps(shipped):
    from utils.explain import heat_map, probabilities_and_maps

    images = np.stack([load_image(p) for p in list_images(EXAMPLES)])
    (kp, km), (lp, lm) = (probabilities_and_maps(shipped[name].explain, images) for name in (MODEL_FILE, LITERT_FILE))
    assert km.shape == lm.shape == (len(images), 10, 10, 2)
    assert np.abs(kp - lp).max() < 1e-4
    assert np.abs(km - lm).max() <= 1e-4 * np.abs(km).max()  # the maps agree to 1e-4 of their range
    for k, lite, p in zip(km, lm, kp, strict=True):
        label = int(np.argmax(p))
        heat, lite_heat = heat_map(k[:, :, label], 160), heat_map(lite[:, :, label], 160)
        assert heat.shape == (160, 160) and heat.max() == pytest.approx(1) and heat.min() >= 0
        assert np.abs(heat - lite_heat).max() < 1e-3  # and so do the pictures


def test_a_mirrored_photo_gives_a_mirrored_map(shipped):
    from utils.explain import heat_map, probabilities_and_maps

    model = shipped[LITERT_FILE]
    images = np.stack([load_image(p) for p in list_images(EXAMPLES)])
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    (probs, maps), (mprobs, mmaps) = (probabilities_and_maps(model.explain, x) for x in (images, mirrored))
    assert np.abs(probs - mprobs).max() < 1e-5
    for m, mm, p in zip(maps, mmaps, probs, strict=True):
        label = int(np.argmax(p))
        assert np.abs(heat_map(m[:, :, label], 160)[:, ::-1] - heat_map(mm[:, :, label], 160)).max() < 1e-4
    # and the network itself, one pass without the mirror average, looks at nearly the same places
    _, plain = model.explain(images)
    _, flipped = model.explain(mirrored)
    corr = [np.corrcoef(a[:, ::-1].ravel(), b.ravel())[0, 1] for a, b in zip(plain, flipped, strict=True)]
    assert min(corr) > 0.7, corr


def test_pointing_game_on_real_photos(shipped, shared_zip):
    """Goal: the peak inside a real photo pasted into a grey canvas 3x its size in at least 90% of 50
    canvases, with the shipped model (benchmarks/pointing_game.py plays more). Turned upside down and
    mirrored, the same maps must miss: the game can tell a wrong map."""
    from pointing_game import canvases, hits

    model = shipped[LITERT_FILE]
    games = list(canvases(shared_zip, 50, seed=0, background="grey"))
    score = hits(model, games)
    assert sum(score) >= 45, f"peak inside the photo on {sum(score)} of 50 canvases"
    assert sum(hits(model, games, lambda h: h[::-1, ::-1])) <= 20


def test_predict_explain_writes_a_picture_per_image(tmp_path):
    out = tmp_path / "explained"
    result = call("predict.py", EXAMPLES, "--explain", "--explain-dir", out, "--json", "--show", tmp_path / "g.png")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == len(list_images(EXAMPLES)) == len(list(out.iterdir()))
    for row in rows:
        with Image.open(row["explained"]) as img:
            assert img.format == "JPEG" and img.size == (2 * 320 + 24, 30 + 320 + 34)
        x, y = row["heat_peak"]
        assert 0 < x < 1 and 0 < y < 1
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    # the pictures are the heat map over the photo: the right half differs from the left, the left is the photo
    with Image.open(rows[0]["explained"]) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=float)
    left, right = pixels[30:350, 8:328], pixels[30:350, 336:656]
    photo = np.asarray(Image.open(rows[0]["path"]).convert("RGB").resize((160, 160)).resize((320, 320)), float)
    assert np.abs(left - photo).mean() < 12 and np.abs(right - left).mean() > 20


def test_names_that_collide_get_numbered(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "pet.jpg").write_bytes((EXAMPLES / "cat_10001.jpg").read_bytes())
    result = call("predict.py", tmp_path / "a", tmp_path / "b", "--explain", "--explain-dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pet-2.jpg", "pet.jpg"]


def test_a_litert_file_without_maps_says_how_to_refresh_it(tmp_path):
    """A .tflite exported before --explain: one line naming `train.py --export`, which then fixes it."""
    from utils.model import build_model, class_names_layer, pack_labels

    class_names_layer()
    model = build_model(32)
    model.save(tmp_path / "old.keras")
    model.export(tmp_path / "old.tflite", format="litert", verbose=False)
    pack_labels(tmp_path / "old.tflite", ["cat", "dog"])
    photo = EXAMPLES / "cat_10001.jpg"
    plain = call("predict.py", photo, "--model", tmp_path / "old.tflite")
    assert plain.returncode == 0, plain.stderr  # it still predicts
    explained = call("predict.py", photo, "--model", tmp_path / "old.tflite", "--explain", "--explain-dir", tmp_path)
    assert explained.returncode == 2 and "Traceback" not in explained.stderr
    assert f"train.py --export {tmp_path / 'old.keras'}" in explained.stderr
    exported = call("train.py", "--export", tmp_path / "old.keras")
    assert exported.returncode == 0, exported.stderr
    again = call("predict.py", photo, "--model", tmp_path / "old.tflite", "--explain", "--explain-dir", tmp_path / "e")
    assert again.returncode == 0, again.stderr
    assert [p.name for p in (tmp_path / "e").iterdir()] == ["cat_10001.jpg"]
    assert call("train.py", "--export", photo).returncode == 2


def test_mistakes_picture_carries_heat_maps(tmp_path, monkeypatch):
    """plot_history.py draws each mistake under the heat map of the class the model wrongly chose."""
    import plot_history
    from utils.explain import blend, heat_map, probabilities_and_maps
    from utils.runtime import load_model

    photos = [EXAMPLES / "cat_10001.jpg", EXAMPLES / "dog_10004.jpg"]
    predictions = [  # both told wrong: the maps must be of "dog" for the cat and of "cat" for the dog
        {"path": str(photos[0]), "true": "cat", "predicted": "dog", "probabilities": {"cat": 0.01, "dog": 0.99}},
        {"path": str(photos[1]), "true": "dog", "predicted": "cat", "probabilities": {"cat": 0.98, "dog": 0.02}},
    ]
    drawn = {}
    monkeypatch.setattr(plot_history, "save_image_grid", lambda images, *a, **kw: drawn.update(images=images, **kw))
    model = load_model(SHIPPED, explain=True)
    plot_history.plot_mistakes(predictions, tmp_path, 12, model)
    assert drawn["heat_legend"] and len(drawn["images"]) == 2
    images = np.stack([load_image(p) for p in photos])
    _, maps = probabilities_and_maps(model.explain, images)
    for image, img, m, chosen in zip(drawn["images"], images, maps, (1, 0), strict=True):
        assert np.array_equal(image, blend(img, heat_map(m[:, :, chosen], 160)))
        assert not np.array_equal(image, blend(img, heat_map(m[:, :, 1 - chosen], 160)))
