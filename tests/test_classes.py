"""Your own classes: 2-, 3- and 5-class folders of real flower photos, through prepare, train, plot and predict."""

import json
import shutil
import zipfile

import numpy as np
import pytest

import utils.warps
from conftest import TINY, call, encode, flower_photos, photo, run, write_files

# odd but valid class names: capitals, spaces, non-ASCII letters
ODD = {"daisy": "Daisy", "roses": "rosé rouge", "tulips": "tulip ünïcode"}


def lines(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def photos(flowers_zip):
    return flower_photos(flowers_zip, 30)


@pytest.fixture(scope="module")
def three(photos, tmp_path_factory):
    """A folder of three classes with odd names, images found recursively (a sub-folder in one class),
    one photo filed under two classes and one copied twice within a class; prepared by prepare_data.py."""
    src = tmp_path_factory.mktemp("three") / "my photos"
    for flower, name in ODD.items():
        files = {f"{flower}{i}.jpg": jpeg for i, jpeg in enumerate(photos[flower][:20])}
        write_files(src / name, dict(list(files.items())[:12]))
        write_files(src / name / "more" / "deeper", dict(list(files.items())[12:]))
    write_files(src / "Daisy", {"copy.JPG": photos["daisy"][0]})  # a byte-identical copy in the same class
    write_files(src / "Daisy", {"twice.jpg": photos["sunflowers"][0]})
    write_files(src / "rosé rouge", {"twice.jpg": photos["sunflowers"][0]})  # the same picture in two classes
    write_files(src, {"LICENSE.txt": b"CC-BY 2.0"})  # a loose file that is not an image is ignored
    out = tmp_path_factory.mktemp("three-split") / "split"
    result = run("prepare_data.py", "--source", src, "--out", out, "--val-fraction", "0.15", "--test-fraction", "0.15")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def three_model(three, tmp_path_factory):
    out = tmp_path_factory.mktemp("three-model")
    result = call("train.py", "--data", three, "--out", out, *TINY)
    assert result.returncode == 0, result.stderr
    return out


def test_prepare_names_classes_after_their_folders_sorted_and_drops_a_picture_in_two_classes(three):
    report = json.loads((three / "report.json").read_text())
    names = sorted(ODD.values())
    assert [c["name"] for c in report["classes"]] == [c["folder"] for c in report["classes"]] == names
    # 20 photos each, found at every depth; the daisy copy counts once, the shared picture is in neither
    assert {c["name"]: c["images"] for c in report["classes"]} == {name: 20 for name in names}
    reasons = {d["path"]: d["reason"] for d in report["dropped"]}
    assert reasons["Daisy/twice.jpg"] == reasons["rosé rouge/twice.jpg"] == "same picture in 2 classes"
    assert reasons["Daisy/daisy0.jpg"] == "duplicate of Daisy/copy.JPG"
    for split, counts in report["splits"].items():
        assert counts == {name: {"train": 14, "val": 3, "test": 3}[split] for name in names}
        for name in names:
            assert len(list((three / split / name).glob("*.jpg"))) == counts[name]
    seen = [p.read_bytes() for p in three.rglob("*.jpg")]
    assert len(seen) == len(set(seen)) == 60, "a picture is in two splits or two classes"


def test_the_names_travel_inside_both_model_files(three, three_model, tmp_path):
    names = sorted(ODD.values())
    assert (three_model / "labels.txt").read_text(encoding="utf-8").splitlines() == names
    assert not (three_model / "cats_vs_dogs.keras").exists()
    rows = {}
    for suffix in ("keras", "tflite"):
        alone = tmp_path / suffix
        alone.mkdir()
        shutil.copy(three_model / f"model.{suffix}", alone / f"copied.{suffix}")  # no labels.txt beside it
        result = call("predict.py", three / "test", "--model", alone / f"copied.{suffix}", "--json", "--top", "2")
        assert result.returncode == 0, result.stderr
        rows[suffix] = {r["path"]: r for r in lines(result)}
        for r in rows[suffix].values():
            assert list(r["probabilities"]) == names and sum(r["probabilities"].values()) == pytest.approx(1, abs=1e-3)
            assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
            assert [t["label"] for t in r["top"]][0] == r["label"] and len(r["top"]) == 2
            assert not any(k.endswith("_probability") for k in r), "dog_probability is for two-class models"
    assert len(rows["keras"]) == 9 and rows["keras"].keys() == rows["tflite"].keys()
    for path, k in rows["keras"].items():  # LiteRT and Keras agree on every label
        t = rows["tflite"][path]
        assert t["label"] == k["label"], path
        for name in names:
            assert t["probabilities"][name] == pytest.approx(k["probabilities"][name], abs=1e-3)


def test_plain_output_and_top_k_name_the_classes(three, three_model):
    result = call("predict.py", three / "test" / "Daisy", "--model", three_model, "--top", "3")
    assert result.returncode == 0, result.stderr
    out = [line.split("\t") for line in result.stdout.splitlines()]
    assert len(out) == 3
    for row in out:
        labels, probs = row[1::2], [float(p) for p in row[2::2]]
        assert sorted(labels) == sorted(ODD.values()) and probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1, abs=2e-3)


def test_metrics_and_pictures_for_n_classes(three_model):
    metrics = json.loads((three_model / "metrics.json").read_text())
    names = sorted(ODD.values())
    assert metrics["classes"] == names and metrics["test_images"] == 9
    assert set(metrics["per_class"]) == set(names)
    f1 = [metrics["per_class"][n]["f1"] for n in names]
    assert metrics["macro_f1"] == pytest.approx(np.mean(f1), abs=1e-3)
    predictions = json.loads((three_model / "test_predictions.json").read_text())
    correct = np.mean([p["true"] == p["predicted"] for p in predictions])
    assert metrics["test_accuracy"] == pytest.approx(correct, abs=1e-4)
    recall = {n: np.mean([p["predicted"] == n for p in predictions if p["true"] == n]) for n in names}
    for n in names:
        assert metrics["per_class"][n]["recall"] == pytest.approx(recall[n], abs=1e-4)
    plots = call("plot_history.py", three_model / "history.json")
    assert plots.returncode == 0, plots.stderr
    assert (three_model / "confusion.png").read_bytes()[:4] == b"\x89PNG"


def test_five_classes_train_and_predict(photos, tmp_path):
    src = tmp_path / "flowers"
    for flower, jpegs in photos.items():
        write_files(src / flower, {f"{i}.jpg": jpeg for i, jpeg in enumerate(jpegs[:16])})
    data, out = tmp_path / "split", tmp_path / "model"
    assert run("prepare_data.py", "--source", src, "--out", data).returncode == 0
    result = call("train.py", "--data", data, "--out", out, *TINY)
    assert result.returncode == 0, result.stderr
    assert "of 5 classes" in result.stdout
    pred = call("predict.py", data / "test", "--model", out / "model.tflite", "--json")
    assert pred.returncode == 0, pred.stderr
    rows = lines(pred)
    assert len(rows) == 10 and all(list(r["probabilities"]) == sorted(photos) for r in rows)


def test_a_two_class_model_of_other_classes_keeps_the_two_class_contract(photos, tmp_path):
    src = tmp_path / "src.zip"
    with zipfile.ZipFile(src, "w") as zf:  # a zip whose classes sit in one wrapping folder
        for flower in ("dandelion", "sunflowers"):
            for i, jpeg in enumerate(photos[flower][:20]):
                zf.writestr(f"mine/{flower}/{i}.jpg", jpeg)
    data, out = tmp_path / "split", tmp_path / "model"
    assert run("prepare_data.py", "--source", src, "--out", data).returncode == 0
    result = call("train.py", "--data", data, "--out", out, *TINY)
    assert result.returncode == 0, result.stderr
    pred = call("predict.py", data / "test", "--model", out / "model.keras", "--json")
    assert pred.returncode == 0, pred.stderr
    for r in lines(pred):
        assert list(r["probabilities"]) == ["dandelion", "sunflowers"]
        assert r["sunflowers_probability"] == r["probabilities"]["sunflowers"]
        assert r["probabilities"]["dandelion"] + r["sunflowers_probability"] == pytest.approx(1, abs=1e-6)
        assert r["label"] == ("sunflowers" if r["sunflowers_probability"] > 0.5 else "dandelion")


def one_error(result):
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and len(errors) == 1 and result.stderr.strip().endswith(errors[0])
    return errors[0]


def test_prepare_refuses_one_class_too_few_images_and_loose_images(photos, tmp_path):
    one = tmp_path / "one"
    write_files(one / "daisy", {f"{i}.jpg": j for i, j in enumerate(photos["daisy"][:10])})
    assert "only the class folder daisy/" in one_error(run("prepare_data.py", "--source", one, "--out", tmp_path / "o"))

    few = tmp_path / "few"
    write_files(few / "daisy", {f"{i}.jpg": j for i, j in enumerate(photos["daisy"][:10])})
    write_files(few / "rare orchid", {f"{i}.jpg": j for i, j in enumerate(photos["roses"][:4])})
    message = one_error(run("prepare_data.py", "--source", few, "--out", tmp_path / "o"))
    assert "class 'rare orchid' has 4 usable image(s)" in message and "val" in message

    loose = tmp_path / "loose"
    write_files(loose / "daisy", {f"{i}.jpg": j for i, j in enumerate(photos["daisy"][:10])})
    write_files(loose / "roses", {f"{i}.jpg": j for i, j in enumerate(photos["roses"][:10])})
    write_files(loose, {"stray.png": encode(photo(), "PNG")})
    message = one_error(run("prepare_data.py", "--source", loose, "--out", tmp_path / "o"))
    assert "lie loose beside the class folders" in message and "stray.png" in message
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def mismatched(tmp_path_factory):
    """Model files whose class names do not match their outputs: 3 outputs, 2 names."""
    import keras

    from utils.export import export_litert
    from utils.model import build_model, class_names_layer

    folder = tmp_path_factory.mktemp("mismatched")
    model = build_model(32, ["a", "b", "c"])
    x = model.get_layer("probabilities").output
    wrong = keras.Model(model.input, class_names_layer()(["a", "b"], name="class_names")(x))
    wrong.save(folder / "wrong.keras")
    export_litert(wrong, folder / "wrong.tflite")
    export_litert(keras.Model(model.input, x), folder / "nameless.tflite")
    return folder


@pytest.mark.parametrize("name", ["wrong.keras", "wrong.tflite"])
def test_predict_refuses_a_model_whose_names_do_not_match_its_outputs(mismatched, name, tmp_path):
    write_files(tmp_path, {"p.jpg": encode(photo(), "JPEG")})
    message = one_error(call("predict.py", tmp_path / "p.jpg", "--model", mismatched / name))
    assert "gives 3 output(s) but names 2 classes (a, b)" in message


def test_predict_takes_labels_txt_beside_a_model_without_names_and_refuses_none(mismatched, tmp_path):
    write_files(tmp_path, {"p.jpg": encode(photo(), "JPEG")})
    model = mismatched / "nameless.tflite"
    assert "carries no class names" in one_error(call("predict.py", tmp_path / "p.jpg", "--model", model))
    (mismatched / "labels.txt").write_text("x\ny\nz\n")
    result = call("predict.py", tmp_path / "p.jpg", "--model", model, "--json")
    assert result.returncode == 0 and list(lines(result)[0]["probabilities"]) == ["x", "y", "z"]


def test_recipe_gives_the_cats_and_dogs_settings_on_their_split_and_more_to_smaller_ones():
    import train

    reference = {"warmup_steps": 287, "ema": 0.99, "bn_momentum": 0.99, "augment": 1.0, "cutmix": 0.0}
    assert train.recipe(18_380) == {"batch_size": 64, "epochs": train.REFERENCE_EPOCHS, **reference}
    small = train.recipe(1_998)  # the flowers: batches of 32, so an epoch has 62 steps, not 31
    assert (
        small["batch_size"] == 32
        and small["epochs"] == 3 * train.REFERENCE_EPOCHS
        and small["augment"] > 1
        and small["ema"] == 0.997
        and small["bn_momentum"] == 0.954
    )
    assert train.recipe(1_998, 64)["bn_momentum"] == 0.908, "a batch given by hand sets the steps an epoch"
    assert train.recipe(48)["batch_size"] == 16 and train.recipe(3_200)["batch_size"] == 64
    assert small["warmup_steps"] >= train.WARMUP_STEPS
    assert train.recipe(20, 4, epochs=3)["ema"] == 0.9, "a tiny run must not average its first weights away"
    assert train.recipe(100_000, 64)["epochs"] == train.REFERENCE_EPOCHS


def test_balanced_weights_give_each_class_the_same_total():

    labels = np.array([0] * 100 + [1] * 20 + [2] * 40)
    w = utils.warps.sample_weights(labels, 3, "balanced")
    totals = [w[labels == c].sum() for c in range(3)]
    assert np.allclose(totals, len(labels) / 3) and w[labels == 1][0] == pytest.approx(5 * w[labels == 0][0])
    assert utils.warps.sample_weights(labels, 3, "none") is None


def test_confusion_matrix_of_20_classes_keeps_cells_large_enough_to_read(tmp_path):
    """Each class gets a cell of at least 40 px (the 2-class picture's cells are about 180 px)."""
    from PIL import Image

    import plot_history

    names = [f"class {i} ünïcode" for i in range(20)]
    predictions = []
    for i in range(200):
        true, predicted = names[i % 20], names[(i * 7) % 20 if i % 3 == 0 else i % 20]
        probs = {n: (0.81 if n == predicted else 0.01) for n in names}
        predictions.append({"path": "x.jpg", "true": true, "predicted": predicted, "probabilities": probs})
    plot_history.plot_confusion(predictions, tmp_path)
    with Image.open(tmp_path / "confusion.png") as img:
        assert min(img.size) >= 20 * 40, img.size
