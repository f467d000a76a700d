"""Label photos as cat or dog with the trained model.

    python predict.py photo.jpg
    python predict.py examples/ more/photos --json
    python predict.py examples/ --show grid.png

PATH may be an image or a folder (searched recursively for .jpg .jpeg .png .bmp
.gif .webp, any case). Exit status: 0 all predicted, 1 some images could not be
read, 2 usage error (no model, not a model, no such path, no images found).
"""

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from utils import (
    IMAGE_EXTENSIONS,
    LABELS,
    LITERT_FILE,
    MODEL_DIR,
    MODEL_FILE,
    BadImage,
    UserError,
    dog_probabilities,
    fail,
    import_keras,
    list_images,
    load_image,
    quiet_stderr,
    save_image_grid,
)

BATCH = 64  # images decoded and predicted at a time, so memory stays flat for any number of files


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument(
        "--model",
        type=Path,
        help=f"a .keras or .tflite model file from train.py (default: {MODEL_DIR / LITERT_FILE} when it is there "
        f"and ai-edge-litert is installed, else {MODEL_DIR / MODEL_FILE})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line: {"path", "label", "dog_probability"} or {"path", "error"}',
    )
    p.add_argument("--show", type=Path, metavar="OUT.png", help="also draw the images with their labels into OUT.png")
    return p.parse_args(argv)


def collect(paths):
    """Expand folders into their image files; raise UserError for a path that gives nothing."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise UserError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) found in folder {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def default_model():
    """models/cats_vs_dogs.tflite when it is there and LiteRT imports (no TensorFlow start-up), else the .keras file."""
    litert = MODEL_DIR / LITERT_FILE
    if litert.is_file():
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError:
            pass
        else:
            return litert
    return MODEL_DIR / MODEL_FILE


def load_model(path):
    """(run, image size): run(batch of uint8 images) -> dog probabilities, from a .keras or .tflite file."""
    if not path.is_file():
        raise UserError(f"model {path} not found; train one with `python train.py` or pass --model FILE")
    run, shape, out_shape = load_litert(path) if path.suffix.lower() == ".tflite" else load_keras(path)
    if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or not shape[1] or tuple(out_shape[1:]) != (1,):
        raise UserError(
            f"{path} takes input {tuple(shape)} and gives {tuple(out_shape)}; "
            "expected a cats-vs-dogs model from train.py (square RGB images in, one probability out)"
        )
    return run, int(shape[1])


def load_keras(path):
    keras = import_keras()
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # a user's file can fail to load in many ways
        raise UserError(
            f"{path} is not a Keras model file ({type(e).__name__}); pass a .keras or .tflite file from train.py"
        ) from None
    if isinstance(model.input_shape, list) or isinstance(model.output_shape, list):
        return None, (), ()

    def run(batch):
        """Full batches run through Keras's compiled predict step (about 2x faster here once traced);
        smaller ones, a single photo say, run eagerly and so skip the tracing."""
        if len(batch) == BATCH:
            return np.asarray(model.predict_on_batch(batch))
        return model(batch, training=False).numpy()

    return run, tuple(model.input_shape), tuple(model.output_shape)


def load_litert(path):
    """The LiteRT interpreter of a .tflite file (numpy in, numpy out; TensorFlow is never imported)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise UserError(
            f"{path} needs the LiteRT runtime: `pip install ai-edge-litert`, or pass --model {MODEL_DIR / MODEL_FILE}"
        ) from None
    try:
        with quiet_stderr():  # LiteRT prints its delegate notice, and its own error, to stderr
            interpreter = Interpreter(model_path=str(path), num_threads=os.cpu_count() or 1)
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    except Exception as e:
        raise UserError(
            f"{path} is not a LiteRT model file ({type(e).__name__}); pass a .keras or .tflite file from train.py"
        ) from None
    if inp["dtype"] != np.float32:
        return None, (), ()
    batch_of = [None]

    def run(batch):
        if batch_of[0] != len(batch):  # the interpreter plans its memory for one batch size
            interpreter.resize_tensor_input(inp["index"], [len(batch), *inp["shape"][1:]])
            with quiet_stderr():  # the XNNPACK delegate announces itself here
                interpreter.allocate_tensors()
            batch_of[0] = len(batch)
        interpreter.set_tensor(inp["index"], np.asarray(batch, dtype=np.float32))
        interpreter.invoke()
        return interpreter.get_tensor(out["index"]).copy()

    return run, tuple(inp["shape"]), tuple(out["shape"])


def predict(files, run, size):
    """Yield (path, dog probability or None, error or None, image or None) for each file, in order."""

    def read(path):
        try:
            return load_image(path, size), None
        except BadImage as e:
            return None, str(e)
        except OSError as e:
            return None, e.strerror or str(e)

    chunks = [files[i : i + BATCH] for i in range(0, len(files), BATCH)]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        pending = [pool.submit(read, path) for path in chunks[0]] if chunks else []
        for n, chunk in enumerate(chunks):
            loaded = [f.result() for f in pending]
            # decode the next batch while the model works on this one (two batches in memory at most)
            pending = [pool.submit(read, path) for path in chunks[n + 1]] if n + 1 < len(chunks) else []
            good = [img for img, _ in loaded if img is not None]
            probs = iter(dog_probabilities(run, np.stack(good))) if good else iter(())
            for path, (img, error) in zip(chunk, loaded, strict=True):
                yield path, (None if error else float(next(probs))), error, img


def show(results, out):
    """Draw the predicted images (as the model saw them) in a grid with label and probability."""
    if results:
        titles = [f"{LABELS[int(p > 0.5)]} {max(p, 1 - p):.0%}\n{Path(path).name[:24]}" for path, p, _, _ in results]
        save_image_grid([img for *_, img in results], titles, f"Predictions of {len(results)} images", out, cols=6)


def main(argv=None):
    args = parse_args(argv)
    try:
        files = collect(args.paths)
        run, size = load_model(args.model or default_model())
    except UserError as e:
        fail(str(e))
    failed, kept = 0, []
    for path, prob, error, img in predict(files, run, size):
        if error:
            failed += 1
            print(json.dumps({"path": str(path), "error": error}) if args.json else f"{path}\terror: {error}")
            print(f"error: {path}: {error}", file=sys.stderr)
            continue
        prob = round(prob, 4)  # the label follows the printed probability, even at 0.50004
        label = LABELS[int(prob > 0.5)]
        if args.json:
            print(json.dumps({"path": str(path), "label": label, "dog_probability": prob}))
        else:
            print(f"{path}\t{label}\t{max(prob, 1 - prob):.3f}")
        if args.show and len(kept) < 64:
            kept.append((path, prob, error, img))
    if args.show:
        try:
            show(kept, args.show)
        except UserError as e:  # a full disk, say
            fail(str(e))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `predict.py folder | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
