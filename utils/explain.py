"""Where the model looked: LayerCAM in closed form inside the model, and heat maps drawn over photos."""

import functools

import numpy as np
from PIL import Image

from utils.backend import import_keras
from utils.evaluate import MIRROR_TTA, as_class_probabilities
from utils.files import UserError

# Where the model looked: LayerCAM (Jiang et al., 2021) at the input of the last block (the block
# before it, after its max pool), a 10 x 10 grid at 160 px. LayerCAM weights each place's features by
# that place's positive gradient of the class score. The gradient is written out in closed form from the
# layers after the features (two convolutions with BatchNorm and ReLU, the skip around the second where
# utils.model.RESIDUAL puts one, max pool, average, dense) as forward operations, so the same graph runs
# inside the .keras model and inside the LiteRT file, with no gradient code and no TensorFlow at prediction.
# It finds the animal more often than Grad-CAM at any layer of these networks (benchmarks/gradcam_layers.py;
# benchmarks/pointing_game.py scores the result).


def backward_kernel(conv, bn):
    """The kernel that carries a gradient back through a 3 x 3 'same' convolution and its BatchNorm:
    the convolution's, flipped in place, inputs and outputs swapped, each output scaled by BatchNorm."""
    scale = np.asarray(bn.gamma) / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)
    kernel = np.asarray(conv.kernel, dtype="float64") * scale  # 3 x 3 x in x out
    return np.ascontiguousarray(kernel[::-1, ::-1].transpose(0, 1, 3, 2)).astype("float32")


def explaining_model(model):
    """model (from build_model) with a second output, batch x h x w x classes: for each photo, the LayerCAM
    map of the class it predicts, zeros for the others (one backward pass a photo, however many classes; a
    sigmoid unit's two classes are the evidence against it and for it). Equals LayerCAM by gradients
    (tests/test_explain.py checks it to 1e-4)."""
    keras = import_keras()
    ops = keras.ops
    blocks = [layer.name[: -len("_relu1")] for layer in model.layers if layer.name.endswith("_relu1")]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    if len(blocks) < 2 or not dense:
        raise ValueError(f"{model.name} is not a network of utils.model.build_model: it has no blocks to explain")
    block, head = blocks[-1], np.asarray(dense[-1].kernel, dtype="float32")  # head: k x outputs
    head = np.concatenate([-head, head], axis=1) if head.shape[1] == 1 else head  # one sigmoid unit: both classes
    features = model.get_layer(f"{blocks[-2]}_pool").output  # A: h x w x c, the maps that get explained
    relu1, relu2 = (model.get_layer(f"{block}_relu{i}").output for i in (1, 2))
    residual = any(layer.name == f"{block}_add" for layer in model.layers)  # pooled: relu1 + relu2
    pooled = model.get_layer(f"{block}_pool").output
    convs = [(model.get_layer(f"{block}_conv{i}"), model.get_layer(f"{block}_bn{i}")) for i in (1, 2)]
    back1, back2 = (backward_kernel(conv, bn) for conv, bn in convs)
    h, w = features.shape[1:3]
    ph, pw = pooled.shape[1:3]

    def class_maps(tensors):
        probs, a, r1, r2, p = tensors
        probs = ops.concatenate([1 - probs, probs], axis=1) if probs.shape[1] == 1 else probs
        # The predicted class, one-hot: the first maximum, the label np.argmax gives (a tie marks one class, not two)
        top = ops.cast(ops.equal(probs, ops.max(probs, axis=1, keepdims=True)), "float32")
        chosen = top * ops.cast(ops.equal(ops.cumsum(top, axis=1), 1.0), "float32")
        # The score's gradient at the pool's input (relu2, or relu1 + relu2 with a skip): the class's dense
        # weights / (ph pw) where a unit is the maximum of its pool window, 0 elsewhere (an odd last row or
        # column is not pooled).
        up = ops.repeat(ops.repeat(p, 2, axis=1), 2, axis=2)
        pooling = (r1 + r2 if residual else r2)[:, : 2 * ph, : 2 * pw]
        routed = ops.cast(ops.equal(pooling, up), "float32")
        routed = ops.pad(routed, [[0, 0], [0, h - 2 * ph], [0, w - 2 * pw], [0, 0]]) / (ph * pw)
        g_pool = routed * ops.matmul(chosen, head.T)[:, None, None, :]
        g = g_pool * ops.cast(ops.greater(r2, 0.0), "float32")  # the second ReLU
        g = ops.conv(g, back2, padding="same")  # back through the second convolution and its BatchNorm
        g = g + g_pool if residual else g  # and along the skip
        g = g * ops.cast(ops.greater(r1, 0.0), "float32")  # the first ReLU
        g = ops.conv(g, back1, padding="same")  # and the first convolution: the gradient at A
        cam = ops.sum(ops.relu(g) * a, axis=-1)  # LayerCAM: each place's features times its positive gradient
        return cam[..., None] * chosen[:, None, None, :]

    maps = keras.layers.Lambda(class_maps, name="class_maps")([model.output, features, relu1, relu2, pooled])
    return keras.Model(model.input, [model.output, maps], name="explained")


def as_class_maps(maps):
    """Explaining outputs as N x h x w x classes. A model file from before LayerCAM gives one sigmoid unit a
    single map m (Grad-CAM's, signed), which becomes (-m, m)."""
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
    """One class's map (h x w) as a heat map of size x size in [0, 1]: its positive evidence, upsampled
    bilinearly over the image and scaled so its peak is 1 (all 0 when there is none)."""
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
