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
    MODEL_DIR,
    MODEL_FILE,
    BadImage,
    UserError,
    fail,
    import_keras,
    list_images,
    load_image,
    save_image_grid,
)

BATCH = 64  # images decoded and predicted at a time, so memory stays flat for any number of files


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--model", type=Path, default=MODEL_DIR / MODEL_FILE, help="Keras model file (default: %(default)s)")
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


def load_model(path):
    """The trained model and the image size it expects, or UserError."""
    if not path.is_file():
        raise UserError(f"model {path} not found; train one with `python train.py` or pass --model FILE")
    keras = import_keras()
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as e:  # a user's file can fail to load in many ways
        raise UserError(
            f"{path} is not a Keras model file ({type(e).__name__}); pass a .keras file from train.py"
        ) from None
    shape = tuple(model.input_shape) if not isinstance(model.input_shape, list) else None
    if not shape or len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2] or tuple(model.output_shape) != (None, 1):
        raise UserError(
            f"{path} takes input {model.input_shape} and gives {model.output_shape}; "
            "expected a cats-vs-dogs model from train.py (square RGB images in, one probability out)"
        )
    return model, shape[1]


def forward(model, batch):
    """Full batches run through Keras's compiled predict step (about 2x faster here once traced);
    smaller ones, a single photo say, run eagerly and so skip the tracing."""
    if len(batch) == BATCH:
        return np.asarray(model.predict_on_batch(batch))
    return model(batch, training=False).numpy()


def predict(files, model, size):
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
            probs = iter(forward(model, np.stack(good)).ravel()) if good else iter(())
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
        model, size = load_model(args.model)
    except UserError as e:
        fail(str(e))
    failed, kept = 0, []
    for path, prob, error, img in predict(files, model, size):
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
        show(kept, args.show)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `predict.py folder | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
