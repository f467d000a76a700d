"""The NumPy augmentation engine: tf.data's batches without TensorFlow, for the JAX backend."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from utils import warps
from utils.backend import import_keras
from utils.warps import AUGMENTATION, warp_transforms


# The NumPy engine: the same batches without TensorFlow (for the JAX backend where TensorFlow is not installed).
# Same plan, same warps and CutMix, drawn by NumPy instead of TensorFlow's random ops, so the images differ
# from the tf.data engine's while following the same distributions.
def resize_array(images, size):
    """resize without TensorFlow: PIL's bilinear filter, widened when shrinking as TensorFlow's antialiased
    resize is (the two differ by rounding: at most 1 of 255 on real photos), as float32."""
    if images.shape[1] == size:
        return images.astype("float32")
    return np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.BILINEAR)) for i in images]).astype(
        "float32"
    )


def random_transforms(rng, n, side, strength=1.0):
    """engine_tf.random_transforms's draws (mirror, rotation, zoom, shift) for n images from a NumPy
    generator, as transforms."""
    a = AUGMENTATION

    def uniform(limit):
        return rng.uniform(-limit, limit, n).astype("float32")

    angle, zoom = uniform(a["rotation"] * strength * 2 * np.pi), 1 + uniform(a["zoom"] * strength)
    shift_x, shift_y = uniform(a["translation"] * strength) * side, uniform(a["translation"] * strength) * side
    mirror = np.sign(uniform(1.0)) if a["horizontal_flip"] is True else np.ones(n, "float32")
    return warp_transforms(angle, zoom, shift_x, shift_y, mirror, np.float32(side), np).astype("float32")


def warp_arrays(images, transforms):
    """ImageProjectiveTransformV3 in NumPy, for the warps augment makes (bilinear, fill mode nearest: a point
    outside the image reads its nearest edge): N images x H x W x C and N x 8 transforms -> float32."""
    n, h, w, c = images.shape
    t = np.asarray(transforms, "float32")[:, :, None]
    gy, gx = (g.ravel()[None] for g in np.mgrid[0:h, 0:w].astype("float32"))
    x = np.clip(t[:, 0] * gx + t[:, 1] * gy + t[:, 2], 0, w - 1)  # N x HW input columns, clamped to the edge
    y = np.clip(t[:, 3] * gx + t[:, 4] * gy + t[:, 5], 0, h - 1)
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = x0.astype(np.intp), y0.astype(np.intp)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    pixels, base = images.reshape(n * h * w, c), (np.arange(n) * (h * w))[:, None]

    def at(row, col):
        return pixels[base + row * w + col].astype("float32")

    top = (1 - fx) * at(y0, x0) + fx * at(y0, x1)
    bottom = (1 - fx) * at(y1, x0) + fx * at(y1, x1)
    return ((1 - fy) * top + fy * bottom).reshape(n, h, w, c)


def cutmix_arrays(images, y, w, rng, share):
    """cutmix in NumPy: one box of each image replaced by the same box of another on a share of the batches
    (warps.MIX "mixup": the whole other image blended in)."""
    n, h, wd = images.shape[:3]
    cut = np.sqrt(rng.uniform())
    bh, bw = int(cut * h), int(cut * wd)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, wd))
    mix = rng.uniform() < share
    other = rng.permutation(n)
    mixup = warps.MIX == "mixup"  # the whole other image, blended in by a share drawn as the box's area is
    if not mix or not (mixup or bh and bw):  # not this batch, or a box of no pixels
        return (images, y) if w is None else (images, y, w)
    if mixup:
        area = cut * cut
        images = ((1 - area) * images + area * images[other]).astype(images.dtype)
    else:
        rows = slice(max(cy - bh // 2, 0), min(cy + bh - bh // 2, h))
        cols = slice(max(cx - bw // 2, 0), min(cx + bw - bw // 2, wd))
        area = (rows.stop - rows.start) * (cols.stop - cols.start) / (h * wd)
        images = images.copy()
        images[:, rows, cols] = images[other, rows, cols]
    y = (1 - area) * y + area * y[other]
    return (images, y) if w is None else (images, y, ((1 - area) * w + area * w[other]).astype("float32"))


def array_batches(x, y, w, plan, strength, mix=0.0, workers=2):
    """warped_batches as a keras.utils.PyDataset with NumPy and PIL doing the work (threads: both release the
    GIL), for the JAX backend without TensorFlow: the same plan of batches and sizes, each batch's warps and
    CutMix drawn from (seed, batch number). Item k is batch k of the run (from first_epoch on), and the dataset
    is endless to Keras, which then keeps one iterator across epochs: Keras restarts a finite PyDataset's
    workers at item 0 each epoch and calls on_epoch_end once more than there are epochs, which would replay or
    shift batches. So Keras's own workers stay off and `workers` threads prepare the next batches instead."""
    keras = import_keras()
    index = plan.index

    def make(k):
        k %= len(index)  # Keras reads a batch or two past the last step; they are never trained on
        i, side, rng = index[k], plan.side[k], np.random.default_rng([plan.seed, int(plan.number[k])])
        images = resize_array(x[i], int(side))
        transforms = random_transforms(rng, plan.width, side, strength)  # for the whole batch
        images = warp_arrays(images, plan.share(transforms))
        if plan.mirror is not None:  # alternating flips (warps.alternate_flips)
            images = np.where(plan.mirror[k][:, None, None, None], images[:, :, ::-1], images)
        if not mix:
            return (images, y[i]) if w is None else (images, y[i], w[i])
        return cutmix_arrays(images, y[i], None if w is None else w[i], rng, mix)

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1)  # no Keras enqueuer
            self.pool, self.ready = ThreadPoolExecutor(workers), {}

        @property
        def num_batches(self):
            return None  # endless: see above

        def __getitem__(self, k):
            for j in range(k, min(k + workers + 1, len(index))):  # this batch and the next ones, under way
                if j not in self.ready:
                    self.ready[j] = self.pool.submit(make, j)
            for j in [j for j in self.ready if j < k]:  # left behind when Keras started over at item 0
                del self.ready[j]
            return (self.ready.pop(k, None) or self.pool.submit(make, k)).result()

    return Batches()
