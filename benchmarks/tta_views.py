"""Test-time views of a trained model: the photo, its mirror, and both shifted, on the val and test splits.

    python benchmarks/tta_views.py models/cats_vs_dogs.tflite data/processed
    python benchmarks/tta_views.py models/flowers/model.tflite data/flowers
    python benchmarks/tta_views.py models/cats_vs_dogs.keras data/processed --sizes 144 176

predict.py averages each photo with its mirror (utils.evaluate.MIRROR_TTA). airbench also averages views
shifted by a few pixels (the image padded by reflection, then cropped): this prints the accuracy and loss of
each combination of views, so that a view enters predict.py only when it helps on validation. --sizes: the
photo and its mirror at other sizes than the one trained (a .keras file: the network takes any size).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.backend import cpu_model  # noqa: E402
from utils.evaluate import accuracy, as_class_probabilities, log_loss, plain_and_mirrored  # noqa: E402
from utils.images import load_images, read_split  # noqa: E402
from utils.runtime import load_model  # noqa: E402

SHIFTS = (4, 8)  # pixels, down and right and then up and left
COMBINATIONS = {  # name: {view: weight}; view "+4_m" is the photo shifted by 4 px, then mirrored
    "one view": {"0": 1},
    "mirror (2 views, the default)": {"0": 1, "0_m": 1},
    **{
        f"mirror and shifts of {d} px (6 views{', airbench weights' if w == 2 else ''})": {
            "0": w,
            "0_m": w,
            f"+{d}": 1,
            f"+{d}_m": 1,
            f"-{d}": 1,
            f"-{d}_m": 1,
        }
        for d in SHIFTS
        for w in (1, 2)
    },
}


def shifted(images, d):
    """Each image seen from d pixels further down and right (d < 0: up and left): pixel (r, c) shows (r + d,
    c + d), and where that is outside the image, its reflection about the edge."""
    p, side = abs(d), images.shape[1]
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    return padded[:, p + d : p + d + side, p + d : p + d + side]


def in_chunks(run):
    """run(images) for any number of images, 64 a call (a model's batch, within memory)."""
    return lambda images: np.concatenate(
        [run(np.ascontiguousarray(images[i : i + 64])) for i in range(0, len(images), 64)]
    )


def view_probabilities(run, images):
    """{view: N x classes probabilities} of every view of COMBINATIONS."""
    run = in_chunks(run)
    views = {}
    for d in (0, *SHIFTS, *(-s for s in SHIFTS)):
        moved = shifted(images, d) if d else images
        for mirror in (False, True):
            x = moved[:, :, ::-1] if mirror else moved
            name = f"{d:+d}" if d else "0"
            views[name + ("_m" if mirror else "")] = as_class_probabilities(run(x))
    return views


def at_any_size(path):
    """run(batch) of a .keras file of train.py rebuilt for images of any size, with its weights."""
    from utils.backend import import_keras
    from utils.model import class_names_layer

    keras = import_keras()
    class_names_layer()
    saved = keras.models.load_model(path, compile=False)
    config = saved.get_config()
    config["layers"][0]["config"]["batch_shape"] = (None, None, None, 3)
    model = keras.Model.from_config(config)
    model.set_weights(saved.get_weights())
    return lambda batch: np.asarray(model.predict_on_batch(batch))


def by_size(path, splits, sizes):
    """Rows of the photo and its mirror (plain_and_mirrored) at each size, on the val and test splits."""
    images = {s: [load_images(paths, s) for paths, _ in splits[1:]] for s in sizes}  # before TensorFlow starts
    run = in_chunks(at_any_size(path))
    for s in sizes:
        row = []
        for x, (_, labels) in zip(images[s], splits[1:], strict=True):
            both = plain_and_mirrored(run, x)[1]
            row += [f"{accuracy(both, np.asarray(labels)):.2%}", f"{log_loss(both, np.asarray(labels)):.4f}"]
        print(f"| mirror (2 views) at {s} px | {' | '.join(row)} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a .keras or .tflite file of train.py")
    p.add_argument("data", type=Path, help="the split it was trained on")
    p.add_argument("--sizes", type=int, nargs="+", help="instead: the photo and its mirror at these sizes")
    args = p.parse_args()
    _, splits = read_split(args.data)
    if args.sizes:
        print(f"CPU: {cpu_model()}; {args.model} on {args.data}")
        print("| views | val accuracy | val loss | test accuracy | test loss |\n|---|---|---|---|---|")
        return by_size(args.model, splits, args.sizes)
    model = load_model(args.model)
    print(f"CPU: {cpu_model()}; {args.model} on {args.data} at {model.size} px")
    print("| views | val accuracy | val loss | test accuracy | test loss |\n|---|---|---|---|---|")
    scores = {name: [] for name in COMBINATIONS}
    for paths, labels in splits[1:]:
        views, labels = view_probabilities(model.run, load_images(paths, model.size)), np.asarray(labels)
        for name, weights in COMBINATIONS.items():
            prob = sum(w * views[v] for v, w in weights.items()) / sum(weights.values())
            scores[name] += [f"{accuracy(prob, labels):.2%}", f"{log_loss(prob, labels):.4f}"]
    for name, row in scores.items():
        print(f"| {name} | {' | '.join(row)} |")


if __name__ == "__main__":
    main()
