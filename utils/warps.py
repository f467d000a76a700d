"""What every augmentation engine shares: the random transforms, the plan of batches, the targets."""

from typing import NamedTuple

import numpy as np

# Random transforms of training images, the one place to tune them. Both engines read this dict:
# rotation as a fraction of a full turn, translation and zoom as fractions of the image side.
AUGMENTATION = dict(
    horizontal_flip=True,  # True: a random mirror each time; "alternate": mirrored every other epoch (airbench)
    rotation=0.04,  # +-14 degrees
    translation=0.1,
    zoom=0.15,
    fill_mode="nearest",
)

# How the batches --cutmix picks are mixed: "cutmix" pastes a box of another image of the batch; "mixup"
# (Zhang et al., 2018, a lever of benchmarks/levers.py) blends the whole other image in instead. Either
# way the other image's share is drawn uniformly, and the targets mix by that share.
MIX = "cutmix"

# Progressive resizing's sizes climb from half the final size in steps of SIZE_STEP pixels (64 and 128
# before 160), each for a share of the progressive epochs in proportion to its side to the power
# PHASE_POWER (0: equal shares). 1.5 keeps the cheap 64 px phase short (cats and dogs: 2 epochs at 64 px,
# then 7 at 128 and 21 at 160, which reaches 96 % sooner than longer small phases: benchmarks/speedrun.md).
SIZE_STEP = 64
PHASE_POWER = 1.5


def image_sizes(final, epochs, progressive):
    """Training image size of each epoch: the first `progressive` share of the epochs climb from half of
    `final` in SIZE_STEP steps, in phases weighted as PHASE_POWER says, each rounded to the nearest epoch;
    the rest train at `final`."""
    small = list(range(max(32, final // 2 // 32 * 32), final, SIZE_STEP))
    n_small = round(progressive * epochs) if small else 0
    weights = [side**PHASE_POWER for side in small]
    ends = np.cumsum(weights) / sum(weights) * n_small  # where each size's phase ends, in epochs
    sizes = [small[np.searchsorted(ends, i + 0.5)] for i in range(n_small)]
    return sizes + [final] * (epochs - n_small)


class Plan(NamedTuple):
    """The batches of a run from its first epoch still to train, which the tf.data and NumPy engines follow.
    index: each batch's image indices, a row each; side: each batch's image size; number: each batch's number
    in the run, which with seed draws its random transforms; width and start: the whole batch's size and where
    this process's columns start in it (0 and the batch size when one process trains); mirror: which images
    of each batch are mirrored, when the flips alternate (None: the engines draw them)."""

    index: np.ndarray
    side: np.ndarray
    number: np.ndarray
    seed: int
    width: int
    start: int
    mirror: np.ndarray | None = None

    def share(self, draws):
        """This process's rows of per-image draws made for the whole batch, so that the processes of a
        --processes run warp their images as one process would warp the whole batch."""
        return draws[self.start : self.start + self.index.shape[1]]  # one process: all of them


def batch_plan(count, batch_size, seed, sizes, first_epoch, part=(0, 1)):
    """The Plan of a run of count images from first_epoch on. Each epoch is a fresh shuffle drawn from
    (seed, epoch), so a resumed run draws the same batches; the ragged last batch of an epoch is dropped.
    part (process i of n): the one place a --processes run is split, process i taking columns
    i x batch_size / n.. of every batch."""
    steps = count // batch_size
    order = [np.random.default_rng([seed, e]).permutation(count)[: steps * batch_size] for e in range(len(sizes))]
    index = np.concatenate(order[first_epoch:]).reshape(-1, batch_size)
    side = np.repeat(np.array(sizes[first_epoch:], dtype="int32"), steps)
    number = np.arange(first_epoch * steps, len(sizes) * steps)
    i, n = part
    share = batch_size // n
    index = index[:, i * share : (i + 1) * share]
    mirror = alternate_flips(index, count, seed, steps, first_epoch)
    return Plan(index, side, number, seed, batch_size, i * share, mirror)


def alternate_flips(index, count, seed, steps, first_epoch):
    """With AUGMENTATION's "alternate" flips (airbench, Jordan 2024): each image is mirrored in every other
    epoch, starting with a random half of them, so that every two epochs show each image both ways; the random
    flip can show an image the same way several epochs running. None for random flips."""
    if AUGMENTATION["horizontal_flip"] != "alternate":
        return None
    first = np.random.default_rng([seed, 1 << 20]).integers(0, 2, count)
    epoch = first_epoch + np.arange(len(index)) // steps
    return (first[index] + epoch[:, None]) % 2 == 1


def warp_transforms(angle, zoom, shift_x, shift_y, mirror, side, xp):
    """Each image's warp as the 8 numbers ImageProjectiveTransformV3 takes (output pixel (x, y) reads the
    input at (t0 x + t1 y + t2, t3 x + t4 y + t5)), computed by xp (tensorflow or numpy) for both engines:
    the input at M (p - c) + c + shift, with M = zoom * rotation * mirror and c the image's centre."""
    c, cos, sin = (side - 1) / 2, xp.cos(angle) * zoom, xp.sin(angle) * zoom
    m00, m01, m10, m11 = cos * mirror, -sin, sin * mirror, cos
    zeros = xp.zeros_like(angle)
    return xp.stack(
        [m00, m01, c - c * (m00 + m01) + shift_x, m10, m11, c - c * (m10 + m11) + shift_y, zeros, zeros], axis=1
    )


def targets(labels, classes):
    """What the loss compares the model's output with: the label itself for two classes (one sigmoid
    unit), one-hot rows for more (softmax)."""
    if classes == 2:
        return labels.astype("float32")
    return np.eye(classes, dtype="float32")[labels]


def sample_weights(labels, classes, how):
    """Each training image's weight: balanced gives class c the weight n / (classes x n_c); none gives
    None, so the batches carry no weights at all."""
    if how == "none":
        return None
    counts = np.bincount(labels, minlength=classes).astype("float64")
    return (len(labels) / (classes * np.maximum(counts, 1)))[labels].astype("float32")
