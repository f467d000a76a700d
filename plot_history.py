"""Draw what training produced: learning curves, a confusion matrix, the worst mistakes.

    python plot_history.py                  # reads models/history.json, writes beside it
    python plot_history.py runs/history.json --out plots/

Writes accuracy.png and loss.png (train vs validation per epoch, the epoch
train.py kept marked: the best validation at the final size) and, when train.py
saved test_predictions.json beside the history, confusion.png and mistakes.png
for the test split: each mistake with the heat map of where the model looked for
the class it wrongly chose (read from the model file beside the history, as
predict.py --explain draws it).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils.config import IMAGE_SIZE, MODEL_DIR  # noqa: E402
from utils.evaluate import best_epoch  # noqa: E402
from utils.explain import blend, heat_map, probabilities_and_maps  # noqa: E402
from utils.files import UserError, fail  # noqa: E402
from utils.images import load_image  # noqa: E402
from utils.plots import save_figure, save_image_grid  # noqa: E402
from utils.runtime import load_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "history",
        nargs="?",
        type=Path,
        default=MODEL_DIR / "history.json",
        help="history.json written by train.py (default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: beside the history)")
    p.add_argument("--mistakes", type=int, default=12, help="how many wrong test images to show (default: %(default)s)")
    return p.parse_args(argv)


def read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; run `python train.py` first to create the {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not a JSON {what} written by train.py") from None


def plot_curves(history, out):
    """One PNG per metric: train and validation by epoch, the kept epoch (the best at the final size) marked."""
    for key in ("accuracy", "val_accuracy", "loss", "val_loss"):
        if not isinstance(history.get(key), list) or not history[key]:
            raise UserError(f"the history has no '{key}' values; is it a history.json written by train.py?")
    epochs = np.arange(1, len(history["accuracy"]) + 1)
    best = best_epoch(history, (history.get("image_size") or [None])[-1])  # the epoch train.py kept
    for metric, title in (("accuracy", "Accuracy"), ("loss", "Loss (cross-entropy)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(epochs, history[metric], "o-", label=f"train {metric}")
        ax.plot(epochs, history[f"val_{metric}"], "s-", label=f"validation {metric}")
        ax.axvline(
            best + 1,
            color="gray",
            linestyle="--",
            label=f"kept: validation accuracy {history['val_accuracy'][best]:.1%} (epoch {best + 1})",
        )
        ax.set(title=f"{title} by epoch", xlabel="epoch", ylabel=metric)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, out / f"{metric}.png")


def read_predictions(predictions):
    """(class names, true labels, predicted labels, probability of the prediction) of test_predictions.json."""
    try:
        names = list(predictions[0]["probabilities"])
        index = {name: i for i, name in enumerate(names)}
        true = np.array([index[p["true"]] for p in predictions])
        pred = np.array([index[p["predicted"]] for p in predictions])
        prob = np.array([p["probabilities"][p["predicted"]] for p in predictions])
    except (KeyError, IndexError, TypeError, AttributeError):
        raise UserError("test_predictions.json is not a list of test predictions written by train.py") from None
    return names, true, pred, prob


def plot_confusion(predictions, out):
    """Counts and row rates of true vs predicted classes on the test split: N x N, readable up to 20+ classes."""
    names, true, pred, _ = read_predictions(predictions)
    n = len(names)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (true, pred), 1)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    side = min(max(4.5, 0.55 * n + 2.5), 40)  # each cell about half an inch wide, up to 68 classes
    fontsize = 13 if n <= 3 else 10 if n <= 8 else 8 if n <= 14 else 6.5
    fig, ax = plt.subplots(figsize=(side + 0.5, side))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for t in range(n):
        for q in range(n):
            if (matrix[t, q] or t == q) and n <= 40:  # beyond 40 classes the colours alone tell the rates
                ax.text(
                    q,
                    t,
                    f"{matrix[t, q]}\n{rates[t, q]:.0%}" if n > 3 else f"{matrix[t, q]}\n{rates[t, q]:.1%}",
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if rates[t, q] > 0.5 else "black",
                )
    short = [name if len(name) <= 18 else name[:17] + "…" for name in names]
    ax.set_xticks(range(n), short, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
    ax.set_yticks(range(n), short)
    ax.set(
        xlabel="predicted class",
        ylabel="true class (row: count and share of the row)",
        title=f"Test split: {np.mean(true == pred):.1%} correct of {len(true)}",
    )
    save_figure(fig, out / "confusion.png")


def explainer(folder):
    """The model that train.py saved in folder, ready to draw heat maps (load_model), or None with a note."""
    try:
        return load_model(folder, explain=True)
    except UserError as e:
        print(f"mistakes.png without heat maps: {e}", file=sys.stderr)
        return None


def plot_mistakes(predictions, out, n, model=None):
    """The test images the model gets most confidently wrong, titled true -> predicted p, each under the
    heat map of where the model looked for the class it chose (when the model is given)."""
    names, true, pred, prob = read_predictions(predictions)
    wrong = [i for i in np.argsort(-prob, kind="stable") if true[i] != pred[i]]
    wrong = [i for i in wrong if Path(predictions[i]["path"]).exists()][:n]
    if not wrong:
        print("no wrong predictions to draw (or their images are gone); skipped mistakes.png")
        return
    size = model.size if model else IMAGE_SIZE
    images = np.stack([load_image(predictions[i]["path"], size) for i in wrong])  # as the model saw them
    title = "Most confident mistakes on the test split (true → predicted p)"
    if model is not None and model.names != names:
        print(f"mistakes.png without heat maps: the model beside the history names {model.names}", file=sys.stderr)
        model = None
    if model is not None:
        _, maps = probabilities_and_maps(model.explain, images)
        images = [blend(img, heat_map(m[:, :, pred[i]], size)) for img, m, i in zip(images, maps, wrong, strict=True)]
        title = "Most confident mistakes on the test split (true → predicted p), where the model looked"
    titles = [f"{names[true[i]][:16]} → {names[pred[i]][:16]} {prob[i]:.2f}" for i in wrong]
    save_image_grid(list(images), titles, title, out / "mistakes.png", heat_legend=model is not None)


def main(argv=None):
    args = parse_args(argv)
    out = args.out or args.history.parent
    try:
        plot_curves(read_json(args.history, "training history"), out)
        predictions_path = args.history.parent / "test_predictions.json"
        if predictions_path.exists():
            predictions = read_json(predictions_path, "list of test predictions")
            plot_confusion(predictions, out)
            plot_mistakes(predictions, out, args.mistakes, explainer(args.history.parent))
    except UserError as e:
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
