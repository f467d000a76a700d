"""predict.py: outputs, exit codes and one-line errors for every bad input."""

import json

import pytest

from conftest import encode, photo, run, write_files


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained model of the real architecture at 32 px, plus a model of the wrong shape."""
    import keras

    from utils import build_model

    folder = tmp_path_factory.mktemp("models")
    build_model(32).save(folder / "tiny.keras")
    wrong = keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)])
    wrong.save(folder / "wrong.keras")
    (folder / "junk.keras").write_bytes(b"not a model at all")
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
    result = run("predict.py", images, "--model", model / "tiny.keras", "--json")
    assert result.returncode == 0, result.stderr
    rows = lines(result)
    assert [r["path"] for r in rows] == [str(images / name) for name in ("b.PNG", "sub/c.gif", "ä cat.jpg")]
    for r in rows:
        assert r["label"] == ("dog" if r["dog_probability"] > 0.5 else "cat")
        assert 0.0 <= r["dog_probability"] <= 1.0


def test_plain_output_one_line_per_image_and_show(model, images, tmp_path):
    grid = tmp_path / "grid.png"
    result = run("predict.py", images / "ä cat.jpg", images / "b.PNG", "--model", model / "tiny.keras", "--show", grid)
    assert result.returncode == 0, result.stderr
    out = [line.split("\t") for line in result.stdout.splitlines()]
    assert [o[0] for o in out] == [str(images / "ä cat.jpg"), str(images / "b.PNG")]
    assert all(o[1] in ("cat", "dog") and 0.5 <= float(o[2]) <= 1.0 for o in out)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreadable_images_give_exit_1_and_the_rest_are_predicted(model, images):
    write_files(images, {"empty.jpg": b"", "fake.png": b"hello", "cut.jpg": encode(photo(), "JPEG")[:900]})
    result = run("predict.py", images, "--model", model / "tiny.keras", "--json")
    assert result.returncode == 1
    rows = {r["path"].split("/")[-1]: r for r in lines(result)}
    assert {n for n, r in rows.items() if "error" in r} == {"empty.jpg", "fake.png", "cut.jpg"}
    assert {n for n, r in rows.items() if "label" in r} == {"ä cat.jpg", "b.PNG", "c.gif"}
    errors = result.stderr.strip().splitlines()
    assert len([e for e in errors if e.startswith("error:")]) == 3 and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_model", "not found"),
        ("junk_model", "is not a Keras model file"),
        ("wrong_model", "expected a cats-vs-dogs model"),
        ("no_path", "no such file or folder"),
        ("empty_folder", "no images"),
    ],
)
def test_usage_errors_exit_2_with_one_line(model, images, tmp_path, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no pictures here")
    target, model_file = images, model / "tiny.keras"
    if case == "no_model":
        model_file = tmp_path / "missing.keras"
    elif case == "junk_model":
        model_file = model / "junk.keras"
    elif case == "wrong_model":
        model_file = model / "wrong.keras"
    elif case == "no_path":
        target = tmp_path / "nope.jpg"
    elif case == "empty_folder":
        target = tmp_path / "empty"
    result = run("predict.py", target, "--model", model_file)
    assert result.returncode == 2
    problem = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(problem) == 1 and message in problem[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_prediction_uses_the_training_preprocessing(model, images):
    """predict.py's probability equals the model applied to utils.load_image's array."""
    import keras
    import numpy as np

    from utils import load_image

    m = keras.models.load_model(model / "tiny.keras")
    expected = float(m(np.stack([load_image(images / "b.PNG", 32)]), training=False).numpy().ravel()[0])
    result = run("predict.py", images / "b.PNG", "--model", model / "tiny.keras", "--json")
    assert lines(result)[0]["dog_probability"] == pytest.approx(expected, abs=1e-4)


def test_many_images_are_streamed_in_bounded_batches(tmp_path):
    """predict() never holds more than BATCH decoded images: memory stays flat for 10,000 files."""
    import numpy as np

    import predict

    write_files(tmp_path, {f"{i:03d}.png": encode(photo((16, 16), seed=i), "PNG") for i in range(150)})

    class Model:
        sizes = []

        def __call__(self, batch, training):
            self.sizes.append(len(batch))
            return type("T", (), {"numpy": lambda s: np.full((len(batch), 1), 0.25)})()

        def predict_on_batch(self, batch):
            self.sizes.append(len(batch))
            return np.full((len(batch), 1), 0.25)

    model = Model()
    stream = predict.predict(sorted(tmp_path.glob("*.png")), model, 32)
    next(stream)
    assert model.sizes == [predict.BATCH], "the first result waited for more than one batch"
    # at most the batch being predicted and the next one being decoded are in memory
    assert len(list(stream)) == 149 and model.sizes == [64, 64, 22]
