"""The one image loader shared by prepare_data, train and predict."""

import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import train
import utils.images
from conftest import BROKEN, VALID, encode, exif_rotated, photo
from utils.files import BadImage
from utils.images import list_images, load_image, open_image


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


# --- utils.images.load_images: a split decoded by forked workers --------------------------------------------
def test_the_workers_decode_every_image_as_load_image_does(real_photos, monkeypatch):
    """80 real photos: the array equals load_image's pixels one by one, and on Linux none of them was
    decoded by this process (the forked workers did all of it)."""
    paths = list_images(real_photos)
    here, real = [], utils.images.load_image
    monkeypatch.setattr(utils.images, "load_image", lambda p, s: here.append(os.getpid()) or real(p, s))
    images = utils.images.load_images(paths, 64)
    assert images.shape == (80, 64, 64, 3) and images.dtype == np.uint8
    assert all(np.array_equal(images[i], load_image(p, 64)) for i, p in enumerate(paths))
    if sys.platform == "linux" and len(os.sched_getaffinity(0)) > 1:
        assert here == [], "the workers did not decode: this process did"


def test_a_failing_worker_leaves_its_images_to_the_parent(real_photos, monkeypatch):
    """A worker that dies (killed, out of memory) costs time, not images: the parent decodes its share."""
    paths, parent, real = list_images(real_photos), os.getpid(), utils.images.load_image
    odd = set(paths[1::2])

    def dies_in_a_worker(p, s):
        if os.getpid() != parent and p in odd:
            os._exit(9)
        return real(p, s)

    monkeypatch.setattr(utils.images, "load_image", dies_in_a_worker)
    images = utils.images.load_images(paths, 48)
    assert all(np.array_equal(images[i], load_image(p, 48)) for i, p in enumerate(paths))


def test_a_bad_file_in_a_split_is_named(real_photos, tmp_path):
    paths = [shutil.copy(p, tmp_path / p.name) for p in list_images(real_photos)]
    bad = paths[37]
    with open(bad, "r+b") as f:
        f.truncate(400)
    with pytest.raises(BadImage, match=f"^{bad}: truncated; run prepare_data.py again"):
        utils.images.load_images([Path(p) for p in paths], 64)


def test_ctrl_c_while_loading_stops_the_workers(real_photos, small_split, tmp_path, monkeypatch, capsys):
    def slow(p, s):
        time.sleep(0.05)  # 80 photos: about 2 s in two workers
        return load_image(p, s)

    def children():  # this process's child processes, zombies included (Linux: /proc/PID/stat's ppid)
        found = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.add(int(stat.parent.name))
            except (OSError, ValueError, IndexError):
                pass  # a process that ended meanwhile
        return found

    monkeypatch.setattr(utils.images, "load_image", slow)
    before = children()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # Ctrl-C to this thread, as a terminal's reaches a train.py that has not started TensorFlow's threads
    threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()
    started = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            utils.images.load_images(list_images(real_photos), 64)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - started < 1.5, "waited for the workers instead of stopping them"
    assert children() == before, "workers left running (or unreaped) after Ctrl-C"

    # train.py itself: one line, exit 130, and no --resume while there is nothing to resume
    monkeypatch.setattr(utils.images, "load_split", lambda *a: signal.raise_signal(signal.SIGINT))
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data", str(small_split), "--out", str(tmp_path / "m"), "--image-size", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 130 and len(err) == 1, err
    assert "interrupted before training began; start again with: python train.py" in err[0]
    assert "--resume" not in err[0]
