"""Where the model looked: Grad-CAM in closed form inside the model, and heat maps drawn over photos."""

import functools

import numpy as np
from PIL import Image

from utils.backend import import_keras
from utils.evaluate import MIRROR_TTA, as_class_probabilities
from utils.files import UserError

# Where the model looked: Grad-CAM (Selvaraju et al., 2017) over the first convolution of the last
# block, a 10 x 10 grid at 160 px. Grad-CAM weights each feature map by the spatial mean of the class
# score's gradient; here that mean is computed in closed form from the layers after the features
# (convolution, BatchNorm, ReLU, max pool, average, dense), so the same few matrix products run inside
# the .keras model and inside the LiteRT file, with no gradient code and no TensorFlow at prediction.
EXPLAIN_BLOCK = -1  # which block's first convolution (the last); benchmarks/pointing_game.py scores it


def explaining_model(model):
    """model (from build_model) with a second output, every class's Grad-CAM map: batch x h x w x outputs,
    the signed evidence for that output's score (one sigmoid unit: for the second class; the first's is
    its negative). Equals Grad-CAM by gradients (tests/test_explain.py checks it to 1e-4)."""
    keras = import_keras()
    ops = keras.ops
    blocks = [layer.name[: -len("_relu1")] for layer in model.layers if layer.name.endswith("_relu1")]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if not blocks or not dense:
        raise ValueError(f"{model.name} is not a network of utils.model.build_model: it has no blocks to explain")
    block, dense = blocks[EXPLAIN_BLOCK], dense[-1]  # the classifier
    features = model.get_layer(f"{block}_relu1").output  # A: h x w x k, the maps that get explained
    activated = model.get_layer(f"{block}_relu2").output  # the second convolution's, after its ReLU
    pooled = model.get_layer(f"{block}_pool").output
    conv, bn = model.get_layer(f"{block}_conv2"), model.get_layer(f"{block}_bn2")
    scale = np.asarray(bn.gamma) / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)
    h, w, k = features.shape[1:]
    ph, pw = pooled.shape[1:3]
    # The score's gradient at the second convolution is dense / (ph pw) where a unit is the maximum of its
    # pool window and positive, 0 elsewhere. Back through the 3 x 3 convolution, its sum over all places
    # needs only, per tap of the kernel, how many such units the tap sees inside the map's border.
    taps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    kernel = np.asarray(conv.kernel, dtype="float64") * scale  # 3 x 3 x k(in) x k(out), BatchNorm folded in
    back = np.concatenate([kernel[dy + 1, dx + 1] for dy, dx in taps], axis=1) / (ph * pw * h * w)  # k x 9k
    back, head = back.astype("float32"), np.asarray(dense.kernel, dtype="float32")  # head: k x outputs

    def class_maps(tensors):
        a, r, p = tensors
        up = ops.repeat(ops.repeat(p, 2, axis=1), 2, axis=2)  # each unit's pool maximum
        r = r[:, : 2 * ph, : 2 * pw]  # an odd row or column is not pooled: it gets no gradient
        routed = ops.cast(ops.logical_and(ops.equal(r, up), ops.greater(r, 0.0)), "float32")
        routed = ops.pad(routed, [[0, 0], [0, h - 2 * ph], [0, w - 2 * pw], [0, 0]])
        seen = [
            ops.sum(routed[:, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)], axis=(1, 2))
            for dy, dx in taps
        ]
        seen = ops.concatenate(seen, axis=1)  # batch x 9k: units seen by each tap, per output channel
        seen = ops.reshape(seen, (-1, 9, k, 1)) * head[None, None]  # times each output's dense weight
        seen = ops.reshape(seen, (-1, 9 * k, head.shape[1]))
        alpha = ops.matmul(back, seen)  # batch x k x outputs: Grad-CAM's weights
        return ops.reshape(ops.matmul(ops.reshape(a, (-1, h * w, k)), alpha), (-1, h, w, head.shape[1]))

    maps = keras.layers.Lambda(class_maps, name="class_maps")([features, activated, pooled])
    return keras.Model(model.input, [model.output, maps], name="explained")


def as_class_maps(maps):
    """Explaining outputs as N x h x w x classes: one sigmoid unit's map m becomes (-m, m)."""
    maps = np.asarray(maps, dtype="float32")
    return np.concatenate([-maps, maps], axis=3) if maps.shape[3] == 1 else maps


def probabilities_and_maps(explain, images):
    """What class_probabilities gives, and each class's map (N x h x w x classes) averaged the same way:
    explain(batch) -> (outputs, maps) for the photos and their mirror images, whose maps are mirrored back."""
    outputs, maps = explain(images)
    probs, maps = as_class_probabilities(outputs), as_class_maps(maps)
    if MIRROR_TTA:
        outputs, mirrored = explain(np.ascontiguousarray(images[:, :, ::-1]))
        probs = (probs + as_class_probabilities(outputs)) / 2
        maps = (maps + as_class_maps(mirrored)[:, :, ::-1]) / 2
    return probs, maps


def heat_map(class_map, size):
    """One class's map (h x w) as a heat map of size x size in [0, 1]: its positive evidence (Grad-CAM's
    ReLU), upsampled bilinearly over the image and scaled so its peak is 1 (all 0 when there is none)."""
    heat = Image.fromarray(np.maximum(class_map, 0).astype(np.float32)).resize((size, size), Image.BILINEAR)
    heat = np.maximum(np.asarray(heat), 0)
    top = heat.max()
    return heat / top if top > 0 else heat


HEAT_COLORMAP = "inferno"  # perceptually uniform: black (the model did not look here) to yellow (it did)


HEAT_ALPHA = 0.55  # share of the colour in the blend; the photo keeps the rest


@functools.cache
def heat_palette():
    """HEAT_COLORMAP as a 256 x 3 uint8 lookup table (matplotlib's colour map, read once)."""
    try:
        from matplotlib import colormaps
    except ImportError:
        raise UserError("heat maps are drawn with matplotlib's colour maps: pip install matplotlib") from None

    return (colormaps[HEAT_COLORMAP](np.linspace(0, 1, 256))[:, :3] * 255 + 0.5).astype(np.uint8)


def heat_colors(heat):
    """heat in [0, 1] (any shape) as uint8 RGB in HEAT_COLORMAP."""
    return heat_palette()[np.clip(np.asarray(heat) * 255 + 0.5, 0, 255).astype(np.uint8)]


def blend(image, heat):
    """A uint8 image with its heat map laid over it (same height and width): HEAT_ALPHA of colour, the rest photo."""
    alpha = round(HEAT_ALPHA * 256)
    mixed = np.asarray(image, dtype=np.uint16) * (256 - alpha) + heat_colors(heat).astype(np.uint16) * alpha
    return (mixed >> 8).astype(np.uint8)
