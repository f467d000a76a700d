"""Models loaded for prediction: a .keras file through Keras, a .tflite file through LiteRT alone."""

import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from utils.backend import import_keras
from utils.config import LABELS_FILE, LITERT_FILE, MODEL_DIR, MODEL_FILE
from utils.explain import explaining_model
from utils.files import UserError, quiet_stderr
from utils.model import class_names_layer, names_of_keras_model, read_labels, unpack_labels

BATCH = 64  # images decoded and predicted at a time, so memory stays flat for any number of files


def litert_available():
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def default_model():
    """models/cats_vs_dogs.tflite when it is there and LiteRT imports (no TensorFlow start-up), else the .keras file."""
    litert = MODEL_DIR / LITERT_FILE
    return litert if litert.is_file() and litert_available() else MODEL_DIR / MODEL_FILE


def model_in(folder):
    """The model file in a folder train.py wrote: its .tflite when LiteRT imports, else its .keras."""
    for suffix in (".tflite", ".keras") if litert_available() else (".keras",):
        found = sorted(folder.glob(f"*{suffix}"))
        if len(found) == 1:
            return found[0]
    raise UserError(f"{folder} holds no single .keras or .tflite model; pass --model FILE")


class Loaded(NamedTuple):
    """A model ready to predict: run(batch of uint8 images) -> its outputs; explain(batch) -> (outputs, each
    output's LayerCAM map), or None when not asked for or the file has no maps (utils.explain.explaining_model)."""

    run: Callable
    size: int
    names: list
    explain: Callable | None


def load_model(path, explain=False):
    """The Loaded model of a .keras or .tflite file that carries its class names (or has labels.txt beside
    it); explain: also its heat maps (UserError when the file cannot give them)."""
    if path.is_dir():
        path = model_in(path)
    if not path.is_file():
        raise UserError(f"model {path} not found; train one with `python train.py` or pass --model FILE")
    load = load_litert if path.suffix.lower() == ".tflite" else load_keras
    run, shape, out_shape, names, explainer = load(path, explain)
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or not shape[1] or len(out_shape) != 2:
        raise UserError(
            f"{path} takes input {tuple(shape)} and gives {tuple(out_shape)}; "
            "expected a model from train.py (square RGB images in, class probabilities out)"
        )
    if names is None and (path.parent / LABELS_FILE).is_file():
        names = read_labels((path.parent / LABELS_FILE).read_bytes())
    if names is None:
        raise UserError(f"{path} carries no class names and has no {LABELS_FILE} beside it; retrain it with train.py")
    outputs = out_shape[1]
    if len(names) != (2 if outputs == 1 else outputs) or len(set(names)) != len(names) or outputs < 1:
        raise UserError(
            f"{path} gives {outputs} output(s) but names {len(names)} classes ({', '.join(names[:5])}"
            f"{', ...' if len(names) > 5 else ''}); its class names do not match its outputs"
        )
    if explain and explainer is None:
        raise UserError(
            f"{path} has no heat maps (a LiteRT file from before --explain, or a model not built by train.py); "
            f"export it again with `python train.py --export {path.with_suffix('.keras')}` or pass its .keras file"
        )
    return Loaded(run, int(shape[1]), list(names), explainer if explain else None)


def load_keras(path, explain=False):
    keras = import_keras()
    class_names_layer()  # registers the layer that carries the names, so load_model finds it
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # a user's file can fail to load in many ways
        raise UserError(
            f"{path} is not a Keras model file ({type(e).__name__}); pass a .keras or .tflite file from train.py"
        ) from None
    if isinstance(model.input_shape, list) or isinstance(model.output_shape, list):
        return None, (), (), None, None

    def run(batch):
        """Full batches run through Keras's compiled predict step (faster once traced); smaller ones, a
        single photo say, run eagerly and so skip the tracing."""
        if len(batch) == BATCH:
            return np.asarray(model.predict_on_batch(batch))
        return np.asarray(model(batch, training=False))  # any backend's tensor

    explain_run = None
    try:
        explainer = explaining_model(model) if explain else None
    except ValueError:  # not the network of build_model: no maps to give
        explainer = None
    if explainer is not None:

        def explain_run(batch):
            outputs = explainer.predict_on_batch(batch) if len(batch) == BATCH else explainer(batch, training=False)
            return tuple(np.asarray(o) for o in outputs)

    return run, tuple(model.input_shape), tuple(model.output_shape), names_of_keras_model(model), explain_run


def load_litert(path, explain=False):
    """The LiteRT interpreter of a .tflite file (numpy in, numpy out; TensorFlow is never imported). train.py's
    files have two outputs: the class probabilities, and the heat maps (4-D) that --explain draws."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        keras_copy = path.with_suffix(".keras")
        raise UserError(
            f"{path} needs the LiteRT runtime: `pip install ai-edge-litert`, or pass --model {keras_copy}"
        ) from None
    try:
        with quiet_stderr():  # LiteRT prints its delegate notice, and its own error, to stderr
            interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
        (inp,), outs = interpreter.get_input_details(), interpreter.get_output_details()
        (out,) = [o for o in outs if len(o["shape"]) != 4] or [None]
        maps = ([o for o in outs if len(o["shape"]) == 4] or [None])[0]
    except Exception as e:
        raise UserError(
            f"{path} is not a LiteRT model file ({type(e).__name__}); pass a .keras or .tflite file from train.py"
        ) from None
    if inp["dtype"] != np.float32 or out is None or len(outs) > 2:
        return None, (), (), None, None
    batch_of = [None]

    def invoke(batch):
        if batch_of[0] != len(batch):  # the interpreter plans its memory for one batch size
            interpreter.resize_tensor_input(inp["index"], [len(batch), *inp["shape"][1:]])
            with quiet_stderr():  # the XNNPACK delegate announces itself here
                interpreter.allocate_tensors()
            batch_of[0] = len(batch)
        interpreter.set_tensor(inp["index"], np.asarray(batch, dtype=np.float32))
        interpreter.invoke()

    def run(batch):
        invoke(batch)
        return interpreter.get_tensor(out["index"]).copy()

    def explain_run(batch):
        invoke(batch)
        return interpreter.get_tensor(out["index"]).copy(), interpreter.get_tensor(maps["index"]).copy()

    explainer = explain_run if maps is not None else None
    return run, tuple(inp["shape"]), tuple(out["shape"]), unpack_labels(path), explainer
