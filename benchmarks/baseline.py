"""The original notebook's pipeline, rebuilt for comparison only (not used by the product).

    python benchmarks/baseline.py --data data/processed --epochs 15 --out runs/baseline

150x150 images through ImageDataGenerator.flow_from_directory (batch 100) with the
notebook's augmentation, three Conv(16/32/64)-BatchNorm-MaxPool-Dropout blocks,
Flatten -> Dense(512) -> Dropout -> sigmoid (9.5 M parameters), RMSprop 1e-3.
Unlike the notebook, validation uses our disjoint split (the notebook's overlapped training).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.backend import import_keras  # noqa: E402
from utils.config import DATA_DIR  # noqa: E402
from utils.files import write_json  # noqa: E402
from utils.images import split_classes  # noqa: E402

SIZE, BATCH = 150, 100
AUGMENTATION = dict(
    rescale=1 / 255,
    rotation_range=40,
    width_shift_range=0.2,
    height_shift_range=0.2,
    shear_range=0.2,
    zoom_range=0.2,
    horizontal_flip=True,
    fill_mode="nearest",
)


def build():
    keras = import_keras()
    layers = keras.layers
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3))])
    for filters in (16, 32, 64):
        model.add(layers.Conv2D(filters, 3, activation="relu"))
        model.add(layers.BatchNormalization())
        model.add(layers.MaxPooling2D(2))
        model.add(layers.Dropout(0.25))
    model.add(layers.Flatten())
    model.add(layers.Dense(512, activation="relu"))
    model.add(layers.Dropout(0.25))
    model.add(layers.Dense(1, activation="sigmoid"))
    model.compile(keras.optimizers.RMSprop(1e-3), "binary_crossentropy", metrics=["accuracy"])
    return model


def flows(data):
    import tensorflow as tf

    idg = tf.keras.preprocessing.image.ImageDataGenerator
    folders = split_classes(data)[1]  # cats/, dogs/ of the Microsoft data
    kw = dict(target_size=(SIZE, SIZE), batch_size=BATCH, class_mode="binary", classes=folders)
    train = idg(**AUGMENTATION).flow_from_directory(str(Path(data) / "train"), **kw)
    val = idg(rescale=1 / 255).flow_from_directory(str(Path(data) / "val"), shuffle=False, **kw)
    return train, val


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA_DIR, help="split from prepare_data.py (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=15, help="the notebook's 15 (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("runs/baseline"), help="history.json goes here")
    args = p.parse_args()
    keras = import_keras()
    train, val = flows(args.data)
    clock = time.perf_counter()
    elapsed = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: logs.update(elapsed_seconds=round(time.perf_counter() - clock))
    )
    history = build().fit(train, validation_data=val, epochs=args.epochs, callbacks=[elapsed], verbose=2)
    write_json(args.out / "history.json", {k: [float(v) for v in vs] for k, vs in history.history.items()})


if __name__ == "__main__":
    main()
