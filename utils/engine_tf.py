"""The default augmentation engine: batches warped and mixed inside tf.data."""

import numpy as np

from utils import warps
from utils.warps import AUGMENTATION, warp_transforms


def resize(images, size):
    """A batch at another side length, the same way for training and validation batches."""
    import tensorflow as tf

    images = tf.cast(images, "float32")
    if isinstance(size, int) and images.shape[1] == size:
        return images
    return tf.image.resize(images, (size, size), antialias=True)


def random_transforms(n, side, seed, strength=1.0):
    """n random warps of images of `side` px (a mirror, rotation, zoom and shift: AUGMENTATION's, the last three
    times `strength`) as the transforms `warp` takes, drawn from `seed` (two integers), so a resumed run draws
    what the interrupted one would have."""
    import tensorflow as tf

    a = AUGMENTATION
    side = tf.cast(side, "float32")
    seeds = tf.random.experimental.stateless_split(seed, 5)

    def uniform(k, limit):
        return tf.random.stateless_uniform([n], seeds[k], -limit, limit)

    angle, zoom = uniform(0, a["rotation"] * strength * 2 * np.pi), 1 + uniform(1, a["zoom"] * strength)
    shift_x = uniform(2, a["translation"] * strength) * side
    shift_y = uniform(3, a["translation"] * strength) * side
    mirror = tf.sign(uniform(4, 1.0)) if a["horizontal_flip"] is True else tf.ones([n])
    return tf.cast(warp_transforms(angle, zoom, shift_x, shift_y, mirror, side, tf), "float32")


def warp(images, transforms):
    """Each image of a batch resampled once by its transform: one resampling per image, where Keras's
    RandomRotation, RandomTranslation and RandomZoom resample once each, which is slower and blurs."""
    import tensorflow as tf

    # the op Keras's affine_transform runs on TensorFlow, called directly: keras.ops inside tf.data fails on
    # the JAX and PyTorch backends (keras-team/keras#21785), plain TensorFlow ops do not
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode=AUGMENTATION["fill_mode"].upper(),
    )


def cutmix(images, y, w, seed, share):
    """CutMix (Yun et al., 2019) on a share of the batches: a random box of each image is replaced by the same
    box of another image of the batch, and targets and weights are mixed by the area of the box (drawn
    uniformly: Beta(1, 1)). The network must then use the whole picture, not the one part that gives the
    class away, which keeps a small training split from being learned by heart. (warps.MIX "mixup": Mixup.)"""
    import tensorflow as tf

    s = tf.random.experimental.stateless_split(seed, 5)
    n, h, wd = tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2]
    cut = tf.sqrt(tf.random.stateless_uniform([], s[0]))  # side of the box / side of the image
    bh, bw = tf.cast(cut * tf.cast(h, "float32"), "int32"), tf.cast(cut * tf.cast(wd, "float32"), "int32")
    cy = tf.random.stateless_uniform([], s[1], 0, h, dtype="int32")
    cx = tf.random.stateless_uniform([], s[2], 0, wd, dtype="int32")
    rows, cols = tf.range(h), tf.range(wd)
    inside_rows = (rows >= cy - bh // 2) & (rows < cy + bh - bh // 2)
    inside_cols = (cols >= cx - bw // 2) & (cols < cx + bw - bw // 2)
    mask = tf.cast(inside_rows[:, None] & inside_cols[None, :], "float32")[:, :, None]
    if warps.MIX == "mixup":  # the whole other image, blended in by a share drawn as the box's area is
        mask = tf.fill([1, 1, 1], cut * cut)
    mask *= tf.cast(tf.random.stateless_uniform([], s[3]) < share, "float32")  # this batch, or not
    area = tf.reduce_mean(mask)
    other = tf.argsort(tf.random.stateless_uniform([n], s[4]))
    images = images * (1 - mask) + tf.gather(images, other) * mask
    y = (1 - area) * y + area * tf.gather(y, other)
    return (images, y) if w is None else (images, y, (1 - area) * w + area * tf.gather(w, other))


def warped_batches(x, y, w, plan, strength, mix=0.0):
    """tf.data batches (images, targets[, weights]) of a warps.Plan (one epoch after the other, each at its
    size), each image warped on the fly, and a share `mix` of the batches CutMixed."""
    import tensorflow as tf

    seeds = np.stack([np.full_like(plan.number, plan.seed), plan.number], axis=1)  # each batch's (seed, number)
    y = tf.convert_to_tensor(y)
    w = None if w is None else tf.convert_to_tensor(w)

    def gather(i):
        # NumPy's indexing picks each batch, from memory or from the cache file of a streamed split. A split
        # handed to TensorFlow instead would be copied twice, and once more into the dataset's graph when its
        # iterator starts: seconds and gigabytes before the first step (benchmarks/speedrun.md).
        images = tf.numpy_function(lambda i: x[i], [i], tf.uint8)
        images.set_shape([None, *x.shape[1:]])
        return images

    def batch(i, s, k, m=None):
        images = resize(gather(i), s)
        transforms = random_transforms(plan.width, tf.shape(images)[1], k, strength)  # for the whole batch
        images = warp(images, plan.share(transforms))
        if m is not None:  # alternating flips: a mirrored warp is the warp of the mirror image, drawn as often
            images = tf.where(m[:, None, None, None], tf.reverse(images, axis=[2]), images)
        if not mix:
            return (images, tf.gather(y, i)) if w is None else (images, tf.gather(y, i), tf.gather(w, i))
        weights = None if w is None else tf.gather(w, i)
        return cutmix(images, tf.gather(y, i), weights, tf.random.experimental.stateless_fold_in(k, 1), mix)

    slices = (plan.index, plan.side, seeds) + (() if plan.mirror is None else (plan.mirror,))
    epochs = tf.data.Dataset.from_tensor_slices(slices).map(batch, num_parallel_calls=2)
    return epochs.prefetch(2)
