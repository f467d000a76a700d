"""The one image loader shared by prepare_data, train and predict."""

import random
import time

import numpy as np
import pytest

from conftest import BROKEN, VALID, encode, exif_rotated, photo
from utils import BadImage, list_images, load_image, open_image


@pytest.mark.parametrize("name", sorted(VALID))
def test_odd_but_valid_images_decode_to_rgb(name):
    img = open_image(VALID[name]())
    assert img.mode == "RGB"
    arr = load_image(VALID[name](), size=64)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    assert arr.std() > 5, "decoded to a flat picture: the pixels were lost"


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_files_are_refused_with_reason(name):
    make, reason = BROKEN[name]
    with pytest.raises(BadImage, match=reason):
        open_image(make())


def test_exif_orientation_is_applied():
    assert open_image(exif_rotated((120, 60))).size == (60, 120)


def test_transparent_background_becomes_white_not_black():
    rgba = np.zeros((10, 10, 4), np.uint8)  # fully transparent black
    from PIL import Image

    img = open_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.asarray(img).min() == 255


def test_huge_jpeg_decodes_at_reduced_scale():
    from PIL import Image

    data = encode(Image.new("RGB", (10000, 10000), (200, 30, 30)), "JPEG", quality=30)
    img = open_image(data)
    assert max(img.size) <= 2500  # the draft mode kept the decode small
    assert load_image(data, 32)[16, 16].astype(int).tolist() == pytest.approx([200, 30, 30], abs=8)


def test_list_images_matches_extensions_in_any_case(tmp_path):
    for name in ("a.jpg", "b.JPEG", "c.Png", "sub/d.webp", "notes.txt", "Thumbs.db"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.JPEG", "c.Png", "d.webp"]


def test_fuzzed_files_decode_or_raise_bad_image_quickly():
    """Random bytes and mutated or cut real JPEG/PNG files: an array or BadImage, never another error."""
    rng = random.Random(0)
    seeds = [encode(photo(seed=1), "JPEG"), encode(photo(seed=2), "PNG")]
    cases = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))) for _ in range(40)]
    for data in seeds:
        cases += [data[: rng.randrange(len(data))] for _ in range(40)]
        for _ in range(80):
            mutated = bytearray(data)
            for _ in range(rng.randrange(1, 20)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            cases.append(bytes(mutated))
    decoded = refused = 0
    start = time.perf_counter()
    for data in cases:
        t = time.perf_counter()
        try:
            assert load_image(data, 32).shape == (32, 32, 3)
            decoded += 1
        except BadImage:
            refused += 1
        assert time.perf_counter() - t < 5, "one file took over 5 s to decode"
    assert decoded + refused == len(cases) and decoded > 0 and refused > 0
    assert time.perf_counter() - start < 60
