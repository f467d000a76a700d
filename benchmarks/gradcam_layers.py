"""Pointing game for heat maps taken at other layers and by other methods: which finds the animal?

    python benchmarks/gradcam_layers.py models/cats_vs_dogs.keras --n 50

Two methods, by gradients (tf.GradientTape, one pass, no mirror): Grad-CAM (each feature map weighted by
its gradient's mean over places: what predict.py --explain drew before LayerCAM) and LayerCAM (Jiang et
al., 2021: each place's features weighted by that place's positive gradient; what it draws now, after the
block before the last's pool, in closed form: utils/explain.py), at
the last block's two convolutions and pool and at the block before it, on pointing_game.py's grey
canvases. A hit is a map whose peak (for the label the model chose) falls inside the pasted photo. Needs
TensorFlow and a .keras file of train.py with two classes.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pointing_game import SHARED_ZIP, canvases  # noqa: E402

from utils.explain import heat_map  # noqa: E402
from utils.images import load_image  # noqa: E402
from utils.model import class_names_layer  # noqa: E402


def layer_maps(model, image, layers):
    """{(layer, method): map for the chosen label of the sigmoid head} for one image (1 x s x s x 3)."""
    import keras
    import tensorflow as tf

    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-1]
    features = {}
    with tf.GradientTape(persistent=True) as tape:
        x = tf.constant(image, tf.float32)
        for step in model.layers[1:]:
            if step is dense:
                logit = (tf.matmul(x, dense.kernel) + dense.bias)[:, 0]
                break
            x = step(x, training=False)
            if step.name in layers:
                tape.watch(x)
                features[step.name] = x
    sign = 1.0 if float(logit[0]) > 0 else -1.0  # the map of the label chosen: dog's, or cat's (its negative)
    maps = {}
    for name in layers:
        a, g = features[name].numpy()[0], sign * tape.gradient(logit, features[name]).numpy()[0]
        maps[name, "Grad-CAM"] = a @ g.mean(axis=(0, 1))
        maps[name, "LayerCAM"] = (np.maximum(g, 0) * a).sum(axis=-1)
    return maps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a .keras file of train.py with two classes")
    p.add_argument("--n", type=int, default=50, help="grey canvases (default: %(default)s)")
    args = p.parse_args()
    import keras

    class_names_layer()  # registers the layer that carries the names, so load_model finds it
    model = keras.models.load_model(args.model, compile=False)
    blocks = [layer.name[: -len("_relu1")] for layer in model.layers if layer.name.endswith("_relu1")]
    layers = [f"{blocks[-1]}_relu1", f"{blocks[-1]}_relu2", f"{blocks[-1]}_pool"]
    layers += [f"{blocks[-2]}_relu2", f"{blocks[-2]}_pool"]
    size, score = model.input_shape[1], {}
    for png, (x0, y0, x1, y1), side in canvases(SHARED_ZIP, args.n, seed=0, background="grey"):
        for key, m in layer_maps(model, load_image(png, size)[None], layers).items():
            y, x = np.unravel_index(np.argmax(heat_map(m, size)), (size, size))
            cx, cy = (x + 0.5) * side / size, (y + 0.5) * side / size
            score[key] = score.get(key, 0) + bool(x0 <= cx < x1 and y0 <= cy < y1)
    for (name, method), hits in score.items():
        print(f"{args.model}: {method} at {name}: peak inside the photo on {hits}/{args.n} canvases")


if __name__ == "__main__":
    main()
