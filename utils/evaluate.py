"""Predictions and their scores: the mirror average of every prediction, accuracy, loss, per-class F1."""

import numpy as np

from utils.backend import cpu_model

# Test-time augmentation: each prediction averages the photo and its mirror image.
# train.py reports validation accuracy with and without it (history.json: val_accuracy_mirror).
MIRROR_TTA = True


def as_class_probabilities(outputs):
    """A model's outputs as N x classes probabilities: one sigmoid unit p becomes (1 - p, p)."""
    outputs = np.asarray(outputs, dtype="float64").reshape(len(outputs), -1)
    return np.concatenate([1 - outputs, outputs], axis=1) if outputs.shape[1] == 1 else outputs


def plain_and_mirrored(run, images):
    """(plain, averaged) class probabilities (N x classes): run(batch) on the images, and averaged with
    their mirror images."""
    plain = as_class_probabilities(run(images))
    mirrored = as_class_probabilities(run(np.ascontiguousarray(images[:, :, ::-1])))
    return plain, (plain + mirrored) / 2


def class_probabilities(run, images):
    """The one prediction of evaluation and predict.py: run(batch) -> N x classes probabilities,
    averaged with the mirrored batch when MIRROR_TTA. images: uint8/float array N x H x W x 3."""
    if MIRROR_TTA:
        return plain_and_mirrored(run, images)[1]
    return as_class_probabilities(run(images))


def accuracy(prob, labels):
    """Share of rows of prob (N x classes) whose most probable class is the label."""
    return float(np.mean(np.argmax(prob, axis=1) == labels))


def log_loss(prob, labels, eps=1e-7):
    return float(-np.mean(np.log(prob[np.arange(len(labels)), labels] + eps)))


def per_class(prob, labels, class_names):
    """Precision, recall and F1 of each class on the test split, and their macro averages (unweighted)."""
    pred = np.argmax(prob, axis=1)
    rows = {}
    for c, name in enumerate(class_names):
        tp = int(np.sum((pred == c) & (labels == c)))
        predicted, actual = int(np.sum(pred == c)), int(np.sum(labels == c))
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows[name] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "images": actual,
        }
    macro = {k: round(float(np.mean([r[k] for r in rows.values()])), 4) for k in ("precision", "recall", "f1")}
    return rows, macro


def best_epoch(history, final_size):
    """Index of the best epoch of a history (columns as in history.json): the highest validation accuracy among
    the epochs at the final size, since the test runs at that size and a smaller size's validation is not its
    figure; of a tie, the later epoch, trained longer and at a lower rate. With none at the final size yet,
    the best of all."""
    accuracy, sizes = history["val_accuracy"], history.get("image_size") or [None] * len(history["val_accuracy"])
    return max(range(len(accuracy)), key=lambda i: (sizes[i] == final_size, accuracy[i], i))


def metrics_of(log, prob, plain, y_test, class_names, run):
    """history.json (per epoch, from the log) and metrics.json (the saved model on the test split: prob and
    plain, its mirror-averaged and its plain class probabilities). run: what the run was (images, settings,
    parameters, precision, device), added to metrics.json as it is."""
    keys = [
        "accuracy",
        "val_accuracy",
        "loss",
        "val_loss",
        "val_accuracy_plain",
        "val_accuracy_mirror",
        "image_size",
        "learning_rate",
        "elapsed_seconds",
    ]
    history = {k: [r[k] for r in log if k in r] for k in keys}
    history = {k: v for k, v in history.items() if v}
    best = best_epoch(history, run["image_size"])
    reached = [r["elapsed_seconds"] for r in log if r["val_accuracy"] >= 0.9]
    classes, macro = per_class(prob, y_test, class_names)
    metrics = {
        "classes": list(class_names),
        "test_accuracy": round(accuracy(prob, y_test), 4),
        "test_accuracy_plain": round(accuracy(plain, y_test), 4),
        "test_loss": round(log_loss(prob, y_test), 4),
        "test_images": len(y_test),
        "macro_precision": macro["precision"],
        "macro_recall": macro["recall"],
        "macro_f1": macro["f1"],
        "per_class": classes,
        "train_images": run["train_images"],
        "val_images": run["val_images"],
        "best_epoch": best + 1,
        "best_val_accuracy": round(history["val_accuracy"][best], 4),
        "epochs": len(log),
        "seconds_to_90_val": reached[0] if reached else None,
        "train_seconds": log[-1]["elapsed_seconds"],  # wall time from process start, data loading included
        **{k: v for k, v in run.items() if k not in ("train_images", "val_images")},
        "cpu": cpu_model(),
    }
    return {"history": history, "metrics": metrics}


def test_predictions(paths, labels, prob, class_names):
    """test_predictions.json's rows: each test image's path, true and predicted class, and probabilities."""
    return [
        {
            "path": str(p),
            "true": class_names[t],
            "predicted": class_names[int(np.argmax(q))],
            "probabilities": {name: round(float(v), 4) for name, v in zip(class_names, q, strict=True)},
        }
        for p, t, q in zip(paths, labels, prob, strict=True)
    ]
