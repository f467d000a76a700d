"""utils.engine_tf.random_transforms and warp: one seeded random warp per image, mirrored or not, and
nothing else when the other transforms are off."""

from unittest import mock

import numpy as np
import pytest

import utils.engine_tf
import utils.images
import utils.warps


@pytest.fixture(scope="module")
def photos(small_split):
    from utils.images import list_split, load_split, split_classes

    images, _, _ = load_split(*list_split(small_split, "train", split_classes(small_split)[1]), 64)
    return images.astype("float32")  # 48 real photos


def warp(images, seed, **settings):
    import tensorflow as tf

    with mock.patch.dict(utils.warps.AUGMENTATION, settings):
        transforms = utils.engine_tf.random_transforms(len(images), images.shape[1], tf.constant(seed, "int64"))
        return utils.engine_tf.warp(tf.constant(images), transforms).numpy()


def test_with_only_the_mirror_each_image_is_itself_or_its_mirror_and_both_happen(photos):
    out = warp(photos, [1, 2], rotation=0.0, zoom=0.0, translation=0.0)
    same = [np.array_equal(o, p) for o, p in zip(out, photos, strict=True)]
    mirrored = [np.array_equal(o, p[:, ::-1]) for o, p in zip(out, photos, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 10 < sum(mirrored) < 38, f"{sum(mirrored)} of 48 mirrored: the coin is not fair"
    still = warp(photos, [1, 2], rotation=0.0, zoom=0.0, translation=0.0, horizontal_flip=False)
    assert np.array_equal(still, photos)


def test_draws_follow_the_seed_so_a_resumed_run_sees_the_same_batches(photos):
    a, b, c = warp(photos, [42, 7]), warp(photos, [42, 7]), warp(photos, [42, 8])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    # a warp moves pixels but keeps the picture: in range, mostly changed, still like the original
    assert a.shape == photos.shape and a.min() >= 0 and a.max() <= 255
    changed = np.mean(np.abs(a - photos), axis=(1, 2, 3)) > 1
    assert changed.mean() > 0.9
    corr = [np.corrcoef(x.ravel(), p.ravel())[0, 1] for x, p in zip(a, photos, strict=True)]
    mirror_corr = [np.corrcoef(x.ravel(), p[:, ::-1].ravel())[0, 1] for x, p in zip(a, photos, strict=True)]
    assert np.median(np.maximum(corr, mirror_corr)) > 0.5


def test_cutmix_pastes_one_box_from_another_image_and_mixes_targets_by_its_area(photos):
    import tensorflow as tf

    n = len(photos)
    y = np.eye(3, dtype="float32")[np.arange(n) % 3]
    w = np.ones(n, dtype="float32")
    seed = tf.constant([3, 4], "int64")
    same = utils.engine_tf.cutmix(tf.constant(photos), tf.constant(y), tf.constant(w), seed, 0.0)
    assert np.array_equal(same[0].numpy(), photos) and np.array_equal(same[1].numpy(), y), "share 0 changed a batch"
    areas = []
    for k in range(6):
        x, t, weight = (a.numpy() for a in utils.engine_tf.cutmix(photos, y, w, tf.constant([k, 9], "int64"), 1.0))
        changed = np.any(x != photos, axis=-1)  # pixels that now come from another photo
        rows, cols = np.nonzero(changed.any(axis=0))
        box = np.zeros(changed.shape[1:], bool)
        if len(rows):
            box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert not np.any(changed & ~box), "pixels changed outside one box"
        area = box.mean()
        areas.append(area)
        # every target is (1 - area) of its own class plus area of the pasted one, and sums to 1
        assert np.allclose(t.sum(axis=1), 1) and np.all(t.max(axis=1) >= 1 - area - 1e-6)
        assert np.allclose(weight, 1)
    assert len(set(np.round(areas, 3))) > 3, "the box does not change from batch to batch"


def blend_partners(photos, mixed):
    """For each mixed image: the photo blended into it and its share (a), from mixed = (1 - a) photo + a other
    (-1 and 0 where the image is unchanged), and how far the image is from that blend."""
    n = len(photos)
    diff = (mixed - photos).reshape(n, -1)
    towards = (photos[None] - photos[:, None]).reshape(n, n, -1)  # towards[i, j]: photo j minus photo i
    share = np.einsum("ip,ijp->ij", diff, towards) / np.maximum(np.einsum("ijp,ijp->ij", towards, towards), 1e-9)
    residual = np.linalg.norm(diff[:, None] - share[..., None] * towards, axis=-1)
    partner = np.where(np.abs(diff).max(axis=1) > 1e-3, residual.argmin(axis=1), -1)
    rows = np.arange(n)
    return partner, share[rows, partner] * (partner >= 0), residual[rows, partner] / (1 + np.linalg.norm(diff, axis=1))


@pytest.mark.parametrize("engine", ["tf", "numpy"])
def test_mixup_blends_one_other_whole_photo_in_and_mixes_targets_by_its_share(photos, engine):
    import tensorflow as tf

    import utils.engine_numpy

    x, n = photos[:16], 16
    y = np.eye(3, dtype="float32")[np.arange(n) % 3]
    w = np.ones(n, dtype="float32")
    shares = []
    with mock.patch.object(utils.warps, "MIX", "mixup"):
        for k in range(4):
            if engine == "tf":
                out = [a.numpy() for a in utils.engine_tf.cutmix(x, y, w, tf.constant([k, 9], "int64"), 1.0)]
            else:
                out = utils.engine_numpy.cutmix_arrays(x, y, w, np.random.default_rng([k, 9]), 1.0)
            mixed, t, weight = out
            partner, share, off = blend_partners(x, mixed)
            moved = partner >= 0
            assert moved.sum() >= n // 2 and np.all(off < 1e-3), "an image is not a blend of two photos"
            a = np.median(share[moved])
            assert 0 < a < 1 and np.allclose(share[moved], a, atol=1e-3), "the share differs within the batch"
            expected = np.where(moved[:, None], (1 - a) * y + a * y[partner], y)
            assert np.allclose(t, expected, atol=1e-3) and np.allclose(weight, 1)
            shares.append(a)
    assert len(set(np.round(shares, 3))) == 4, "the share does not change from batch to batch"


def test_alternating_flips_show_each_image_both_ways_in_every_two_epochs_in_both_engines(photos):
    import utils.augment

    x, y = photos.astype("uint8"), np.arange(len(photos), dtype="float32")
    settings = dict(horizontal_flip="alternate", rotation=0.0, zoom=0.0, translation=0.0)
    seen = {}
    with mock.patch.dict(utils.warps.AUGMENTATION, settings):
        for engine in ("layers", "numpy"):
            data = utils.augment.batches(engine, x, y, None, 16, 5, [64, 64, 64], 0, 1.0, 0.0, 1, (0, 1))
            steps = [data[k] for k in range(9)] if engine == "numpy" else list(data.take(9).as_numpy_iterator())
            mirrored = np.zeros((3, len(x)), bool)  # epoch x image
            for k, (images, labels) in enumerate(steps):
                for image, i in zip(images, labels.astype(int), strict=True):
                    assert np.array_equal(image, x[i]) or np.array_equal(image, x[i][:, ::-1])
                    mirrored[k // 3, i] = np.array_equal(image, x[i][:, ::-1])
            seen[engine] = mirrored
    mirrored = seen["layers"]
    assert np.array_equal(seen["numpy"], mirrored), "the engines flip different images"
    assert np.all(mirrored[0] != mirrored[1]) and np.all(mirrored[1] != mirrored[2]), "an image kept its side"
    assert 10 < mirrored[0].sum() < 38, f"{mirrored[0].sum()} of 48 mirrored first: not a random half"


@pytest.mark.parametrize("step", [32, 64])
@pytest.mark.parametrize("power", [0, 1, 1.5])
def test_progressive_sizes_climb_from_half_the_final_size_each_for_its_share_of_the_epochs(monkeypatch, step, power):
    monkeypatch.setattr(utils.warps, "SIZE_STEP", step)
    monkeypatch.setattr(utils.warps, "PHASE_POWER", power)
    for final, epochs, share in [(160, 27, 0.7), (160, 90, 0.7), (128, 12, 0.5), (176, 9, 0.6), (160, 10, 0.7)]:
        sizes = utils.warps.image_sizes(final, epochs, share)
        n_small = round(share * epochs)
        assert len(sizes) == epochs and sizes[n_small:] == [final] * (epochs - n_small)
        ladder = list(range(final // 2 // 32 * 32, final, step))  # from half the final size, below it
        assert sizes[:n_small] == sorted(sizes[:n_small]), "the sizes shrink somewhere"
        assert sizes[0] == ladder[0] and set(sizes[:n_small]) <= set(ladder), sizes
        weights = [size**power for size in ladder]
        for size, weight in zip(ladder, weights, strict=True):  # each phase within an epoch of its share
            assert abs(sizes.count(size) - n_small * weight / sum(weights)) < 1, (size, sizes)
    assert utils.warps.image_sizes(160, 5, 0) == [160] * 5


def test_the_default_schedule_and_the_earlier_ones_as_measured(monkeypatch):
    import train

    epochs, share = train.REFERENCE_EPOCHS, train.parse_args([]).progressive  # the cats-and-dogs split's
    assert utils.warps.image_sizes(160, epochs, share) == [64] * 2 + [128] * 7 + [160] * 21
    assert utils.warps.image_sizes(160, epochs, 0.57) == [64] * 4 + [128] * 13 + [160] * 13  # the one before
    monkeypatch.setattr(utils.warps, "PHASE_POWER", 1)  # schedule-27
    assert utils.warps.image_sizes(160, 27, 0.7) == [64] * 6 + [128] * 13 + [160] * 8
    monkeypatch.setattr(utils.warps, "PHASE_POWER", 0)  # size-step-64
    assert utils.warps.image_sizes(160, 30, 0.7) == [64] * 11 + [128] * 10 + [160] * 9
    monkeypatch.setattr(utils.warps, "SIZE_STEP", 32)  # the earlier default (levers.py's earlier-schedule)
    assert utils.warps.image_sizes(160, 30, 0.7) == [64] * 7 + [96] * 7 + [128] * 7 + [160] * 9
