"""predict.py: outputs, exit codes and one-line errors for every bad input."""

import json

import pytest

from conftest import call, encode, photo, run, write_files


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained model of the real architecture at 32 px (.keras and .tflite), models of the
    wrong shape, and files that are no models at all."""
    import keras

    from utils.export import export_litert
    from utils.model import build_model

    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(0)  # an untrained model's outputs differ by little: make them the same every run
    tiny = build_model(32)
    tiny.save(folder / "tiny.keras")
    export_litert(tiny, folder / "tiny.tflite")
    wrong = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)])
    wrong.save(folder / "wrong.keras")
    export_litert(wrong, folder / "wrong.tflite")
    (folder / "junk.keras").write_bytes(b"not a model at all")
    (folder / "junk.tflite").write_bytes(b"not a model at all")
    return folder


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "my photos"
    write_files(folder, {"ä cat.jpg": encode(photo(seed=1), "JPEG"), "b.PNG": encode(photo(seed=2), "PNG")})
    write_files(folder / "sub", {"c.gif": encode(photo(seed=3).convert("P"), "GIF"), "notes.txt": b"skip me"})
    return folder


def lines(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_folder_recursive_json_output(model, images):
    result = call("predict.py", images, "--model", model / "tiny.keras", "--json")
    assert result.returncode == 0, result.stderr
    rows = lines(result)
    assert [r["path"] for r in rows] == [str(images / name) for name in ("b.PNG", "sub/c.gif", "ä cat.jpg")]
    for r in rows:
        assert r["label"] == ("dog" if r["dog_probability"] > 0.5 else "cat")
        assert 0.0 <= r["dog_probability"] <= 1.0


def test_plain_output_one_line_per_image_and_show(model, images, tmp_path):
    grid = tmp_path / "grid.png"
    result = call("predict.py", images / "ä cat.jpg", images / "b.PNG", "--model", model / "tiny.keras", "--show", grid)
    assert result.returncode == 0, result.stderr
    out = [line.split("\t") for line in result.stdout.splitlines()]
    assert [o[0] for o in out] == [str(images / "ä cat.jpg"), str(images / "b.PNG")]
    assert all(o[1] in ("cat", "dog") and 0.5 <= float(o[2]) <= 1.0 for o in out)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreadable_images_give_exit_1_and_the_rest_are_predicted(model, images):
    write_files(images, {"empty.jpg": b"", "fake.png": b"hello", "cut.jpg": encode(photo(), "JPEG")[:900]})
    result = call("predict.py", images, "--model", model / "tiny.keras", "--json")
    assert result.returncode == 1
    rows = {r["path"].split("/")[-1]: r for r in lines(result)}
    assert {n for n, r in rows.items() if "error" in r} == {"empty.jpg", "fake.png", "cut.jpg"}
    assert {n for n, r in rows.items() if "label" in r} == {"ä cat.jpg", "b.PNG", "c.gif"}
    errors = result.stderr.strip().splitlines()
    assert len([e for e in errors if e.startswith("error:")]) == 3 and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["keras", "tflite"])
@pytest.mark.parametrize(
    "case, message",
    [
        ("no_model", "not found"),
        ("junk_model", "is not a {} model file"),
        ("wrong_model", "expected a model from train.py"),
        ("no_path", "no such file or folder"),
        ("empty_folder", "no images"),
    ],
)
def test_usage_errors_exit_2_with_one_line(model, images, tmp_path, case, message, kind):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    target, model_file = images, model / f"tiny.{kind}"
    message = message.format({"keras": "Keras", "tflite": "LiteRT"}[kind])
    if case == "no_model":
        model_file = tmp_path / f"missing.{kind}"
    elif case == "junk_model":
        model_file = model / f"junk.{kind}"
    elif case == "wrong_model":
        model_file = model / f"wrong.{kind}"
    elif case == "no_path":
        target = tmp_path / "nope.jpg"
    elif case == "empty_folder":
        target = tmp_path / "empty"
    result = call("predict.py", target, "--model", model_file)
    assert result.returncode == 2
    problem = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(problem) == 1 and message in problem[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("kind", ["keras", "tflite"])
def test_prediction_uses_the_training_preprocessing(model, images, kind):
    """predict.py's probability is the model applied to utils.load_image's array, averaged with
    its mirror image (utils.MIRROR_TTA), by either runtime."""
    import keras
    import numpy as np

    from utils.evaluate import MIRROR_TTA
    from utils.images import load_image

    m = keras.models.load_model(model / "tiny.keras")
    image = np.stack([load_image(images / "b.PNG", 32)])
    mirror = image[:, :, ::-1]
    plain, flipped = (float(m(x, training=False).numpy().ravel()[0]) for x in (image, mirror))
    assert abs(plain - flipped) > 1e-4, "the test photo must look different mirrored"
    expected = (plain + flipped) / 2 if MIRROR_TTA else plain
    result = call("predict.py", images / "b.PNG", "--model", model / f"tiny.{kind}", "--json")
    assert lines(result)[0]["dog_probability"] == pytest.approx(expected, abs=1e-4)


def test_default_model_is_the_litert_file_and_never_imports_tensorflow(model, images, tmp_path):
    """Without --model, predict.py takes models/cats_vs_dogs.tflite, and TensorFlow stays unloaded."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "models").mkdir()
    shutil.copy(model / "tiny.tflite", tmp_path / "models" / "cats_vs_dogs.tflite")
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import predict; "
        f"rc = predict.main([{str(images)!r}, '--json']); "
        "print('loaded:', sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "loaded: []"
    assert len(result.stdout.splitlines()) == 4 and result.stderr == ""


def fake_missing_litert(tmp_path):
    """An environment in which `import ai_edge_litert` fails, as on a machine without it."""
    fake = tmp_path / "fake" / "ai_edge_litert"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ai_edge_litert')\n")
    return {"PYTHONPATH": str(fake.parent)}


def test_without_litert_the_default_falls_back_to_keras_and_a_tflite_file_says_what_to_install(model, images, tmp_path):
    import shutil

    (tmp_path / "models").mkdir()
    shutil.copy(model / "tiny.tflite", tmp_path / "models" / "cats_vs_dogs.tflite")
    shutil.copy(model / "tiny.keras", tmp_path / "models" / "cats_vs_dogs.keras")
    env = fake_missing_litert(tmp_path)
    fallback = run("predict.py", images, "--json", cwd=tmp_path, env=env)
    assert fallback.returncode == 0, fallback.stderr
    assert len(lines(fallback)) == 3
    refused = run("predict.py", images, "--model", model / "tiny.tflite", cwd=tmp_path, env=env)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.strip().splitlines() == [
        f"error: {model / 'tiny.tflite'} needs the LiteRT runtime: `pip install ai-edge-litert`, "
        f"or pass --model {model / 'tiny.keras'}"
    ]


def test_many_images_are_streamed_in_bounded_batches(tmp_path):
    """predict() never holds more than BATCH decoded images: memory stays flat for 10,000 files."""
    import numpy as np

    import predict
    from utils.evaluate import MIRROR_TTA

    write_files(tmp_path, {f"{i:03d}.png": encode(photo((16, 16), seed=i), "PNG") for i in range(150)})

    sizes = []

    def model(batch):
        sizes.append(len(batch))
        return np.full((len(batch), 1), 0.25)

    stream = predict.predict(sorted(tmp_path.glob("*.png")), model, 32)
    next(stream)
    passes = 2 if MIRROR_TTA else 1  # the photos, and their mirror images
    assert sizes == [predict.BATCH] * passes, "the first result waited for more than one batch"
    # at most the batch being predicted and the next one being decoded are in memory
    assert len(list(stream)) == 149 and sizes == [n for n in (64, 64, 22) for _ in range(passes)]
