"""Draw what training produced: learning curves, a confusion matrix, the worst mistakes.

    python plot_history.py                  # reads models/history.json, writes beside it
    python plot_history.py runs/history.json --out plots/

Writes accuracy.png and loss.png (train vs validation per epoch, the best
validation epoch marked) and, when train.py saved test_predictions.json beside
the history, confusion.png and mistakes.png for the test split.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils import LABELS, MODEL_DIR, UserError, fail, open_image, save_figure, save_image_grid  # noqa: E402


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
    """One PNG per metric: train and validation by epoch, best validation accuracy marked."""
    for key in ("accuracy", "val_accuracy", "loss", "val_loss"):
        if not isinstance(history.get(key), list) or not history[key]:
            raise UserError(f"the history has no '{key}' values; is it a history.json written by train.py?")
    epochs = np.arange(1, len(history["accuracy"]) + 1)
    best = int(np.argmax(history["val_accuracy"]))
    for metric, title in (("accuracy", "Accuracy"), ("loss", "Loss (binary cross-entropy)")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(epochs, history[metric], "o-", label=f"train {metric}")
        ax.plot(epochs, history[f"val_{metric}"], "s-", label=f"validation {metric}")
        ax.axvline(
            best + 1,
            color="gray",
            linestyle="--",
            label=f"best validation accuracy {history['val_accuracy'][best]:.1%} (epoch {best + 1})",
        )
        ax.set(title=f"{title} by epoch", xlabel="epoch", ylabel=metric)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
        save_figure(fig, out / f"{metric}.png")


def plot_confusion(predictions, out):
    """Counts and row rates of true vs predicted labels on the test split."""
    true = np.array([p["label"] for p in predictions])
    pred = np.array([p["dog_probability"] > 0.5 for p in predictions]).astype(int)
    matrix = np.array([[np.sum((true == t) & (pred == q)) for q in (0, 1)] for t in (0, 1)])
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for t in (0, 1):
        for q in (0, 1):
            ax.text(
                q,
                t,
                f"{matrix[t, q]}\n{rates[t, q]:.1%}",
                ha="center",
                va="center",
                fontsize=13,
                color="white" if rates[t, q] > 0.5 else "black",
            )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=LABELS,
        yticklabels=LABELS,
        xlabel="predicted label",
        ylabel="true label",
        title=f"Test split: {np.mean(true == pred):.1%} correct of {len(true)}",
    )
    save_figure(fig, out / "confusion.png")


def plot_mistakes(predictions, out, n):
    """The test images the model gets most confidently wrong."""
    wrong = [p for p in predictions if (p["dog_probability"] > 0.5) != bool(p["label"])]
    wrong.sort(key=lambda p: -abs(p["dog_probability"] - 0.5))
    wrong = [p for p in wrong if Path(p["path"]).exists()][:n]
    if not wrong:
        print("no wrong predictions to draw (or their images are gone); skipped mistakes.png")
        return
    images = [open_image(p["path"]) for p in wrong]
    titles = [f"true {LABELS[p['label']]}\nP(dog) = {p['dog_probability']:.2f}" for p in wrong]
    save_image_grid(images, titles, "Most confident mistakes on the test split", out / "mistakes.png")


def main(argv=None):
    args = parse_args(argv)
    out = args.out or args.history.parent
    try:
        plot_curves(read_json(args.history, "training history"), out)
        predictions_path = args.history.parent / "test_predictions.json"
        if predictions_path.exists():
            predictions = read_json(predictions_path, "list of test predictions")
            plot_confusion(predictions, out)
            plot_mistakes(predictions, out, args.mistakes)
    except UserError as e:
        fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
