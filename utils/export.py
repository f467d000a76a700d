"""The saved model's LiteRT copy, with heat maps and class names inside, for predict.py without TensorFlow."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from utils.backend import backend, has_tensorflow, import_keras
from utils.config import LABELS_FILE
from utils.explain import explaining_model
from utils.files import UserError, atomic_write, write_json
from utils.model import class_names_layer, labels_bytes, model_files, names_of_keras_model, pack_labels

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"  # its --export runs on TensorFlow


def export_litert(model, path):
    """The model as a LiteRT (.tflite) file with built-in ops only, for predict.py without TensorFlow: two
    outputs, the model's and its classes' heat maps (explaining_model), and the class names packed
    inside as labels.txt."""
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its SavedModel's signature
        try:
            model = explaining_model(model)
        except ValueError:  # not train.py's network (tests make such files): no heat maps to add
            pass
        model.export(path, format="litert", verbose=False)
    names = names_of_keras_model(model)
    if names:
        pack_labels(path, names)


def export_in_tensorflow(keras_path):
    """The .tflite beside a .keras written on another backend: LiteRT's converter needs TensorFlow, so
    `train.py --export` runs it in a process of its own on the TensorFlow backend. False when it could not."""
    if has_tensorflow():
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        command = [sys.executable, str(TRAIN_SCRIPT), "--export", str(keras_path)]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        why = (result.stderr.splitlines() or ["?"])[-1] if result.returncode else None
    else:
        why = "TensorFlow, which LiteRT's converter needs, is not installed here"
    if why:
        print(
            f"note: {keras_path} is saved, its LiteRT copy is not ({why}); predict.py reads the .keras, or write the "
            f".tflite where TensorFlow is installed: KERAS_BACKEND=tensorflow python train.py --export {keras_path}",
            file=sys.stderr,
        )
    return not why


def export_step(keras_path):
    """train.py --export: the .tflite of a saved .keras model, written beside it."""
    keras = import_keras()
    class_names_layer()  # registers the layer that carries the names
    if not keras_path.is_file() or keras_path.suffix.lower() != ".keras":
        raise UserError(f"--export takes a .keras model file from train.py; {keras_path} is not one")
    try:
        model = keras.models.load_model(keras_path, compile=False)
        explaining_model(model)
    except Exception as e:  # a user's file can fail to load in many ways
        raise UserError(f"{keras_path} is not a model from train.py ({type(e).__name__}: {e})") from None
    litert = keras_path.with_suffix(".tflite")
    atomic_write(litert, lambda tmp: export_litert(model, tmp), need=8 * model.count_params(), staged=True)
    print(f"wrote {litert}")


def save_run(out, final, class_names, history, predictions, litert=True):
    """A finished run's files in out, each whole or not at all: the model (.keras), its LiteRT copy (.tflite,
    on another backend only when litert, through TensorFlow in a process of its own), labels.txt,
    history.json, test_predictions.json and metrics.json. Returns the model files written."""
    keras_file, litert_file = (out / name for name in model_files(class_names))
    atomic_write(keras_file, final.save, need=4 * final.count_params())
    if backend() == "tensorflow":
        atomic_write(litert_file, lambda tmp: export_litert(final, tmp), need=8 * final.count_params(), staged=True)
    elif not litert or not export_in_tensorflow(keras_file):
        litert_file = None
    atomic_write(out / LABELS_FILE, lambda tmp: Path(tmp).write_bytes(labels_bytes(class_names)))
    write_json(out / "history.json", history["history"])
    write_json(out / "test_predictions.json", predictions)
    write_json(out / "metrics.json", history["metrics"])
    return [f for f in (keras_file, litert_file) if f]
