"""Shared fixtures: real photos from ../shared, and images with every defect, made with PIL."""

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED_ZIP = ROOT.parent / "shared" / "data" / "PetImages-180px.zip"
FLOWERS_ZIP = ROOT.parent / "shared" / "data" / "flowers-5-256px.zip"
sys.path.insert(0, str(ROOT))


def run(script, *args, cwd=ROOT, timeout=300, env=None, **kw):
    """Run one of the project's scripts the way a user does (env: variables to add); return the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


@pytest.fixture(scope="session")
def shared_zip():
    if not SHARED_ZIP.exists():
        pytest.skip(f"real photos not available: {SHARED_ZIP} is absent (CI has it beside the clone)")
    return SHARED_ZIP


@pytest.fixture(scope="session")
def flowers_zip():
    if not FLOWERS_ZIP.exists():
        pytest.skip(f"real flower photos not available: {FLOWERS_ZIP} is absent (CI has it beside the clone)")
    return FLOWERS_ZIP


def flower_photos(zip_path, per_class):
    """{class: [jpeg bytes, ...]}: the first per_class photos of each of the zip's five classes."""
    photos = {}
    with zipfile.ZipFile(zip_path) as zf:
        for name in sorted(zf.namelist()):
            parts = name.split("/")
            if len(parts) == 3 and name.endswith(".jpg") and len(photos.setdefault(parts[1], [])) < per_class:
                photos[parts[1]].append(zf.read(name))
    return photos


@pytest.fixture(scope="session")
def real_photos(shared_zip, tmp_path_factory):
    """A folder PetImages/Cat, PetImages/Dog with 40 real photos of each class."""
    root = tmp_path_factory.mktemp("real") / "PetImages"
    with zipfile.ZipFile(shared_zip) as zf:
        for cls in ("Cat", "Dog"):
            (root / cls).mkdir(parents=True)
            names = sorted(n for n in zf.namelist() if n.startswith(f"PetImages/{cls}/") and n.endswith(".jpg"))
            for name in names[:40]:
                (root / cls / Path(name).name).write_bytes(zf.read(name))
    return root


# The tiniest real training run: one epoch of 16-image batches at 64 px.
TINY = ["--epochs", "1", "--batch-size", "16", "--image-size", "64"]


@pytest.fixture(scope="session")
def small_split(real_photos, tmp_path_factory):
    """A split of 30 real photos per class (24/3/3), made by prepare_data.py."""
    out = tmp_path_factory.mktemp("split") / "processed"
    result = run("prepare_data.py", "--source", real_photos.parent, "--out", out, "--limit", "30")
    assert result.returncode == 0, result.stderr
    return out


def photo(size=(120, 90), seed=0):
    """A small picture with some structure (a gradient plus noise) as an RGB PIL image."""
    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
    arr = np.clip(grad + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def exif_rotated(size=(120, 60)):
    """A JPEG stored landscape whose EXIF says 'rotate 90°': it shows portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo(size), "JPEG", exif=exif.tobytes())


# Odd but valid: every one of these must be kept.
VALID = {
    "plain.jpg": lambda: encode(photo(), "JPEG"),
    "upper.JPG": lambda: encode(photo(seed=1), "JPEG"),
    "long.jpeg": lambda: encode(photo(seed=2), "JPEG"),
    "gray.jpg": lambda: encode(photo(seed=3).convert("L"), "JPEG"),
    "cmyk.jpg": lambda: encode(photo(seed=4).convert("CMYK"), "JPEG"),
    "png_named.jpg": lambda: encode(photo(seed=5), "PNG"),
    "rgba.png": lambda: encode(photo(seed=6).convert("RGBA"), "PNG"),
    "bitmap.bmp": lambda: encode(photo(seed=7), "BMP"),
    "anim.gif": lambda: encode(photo(seed=8).convert("P"), "GIF"),
    "huge.jpg": lambda: encode(photo((4000, 3000), seed=9), "JPEG", quality=50),
    "rotated.jpg": exif_rotated,
    "web.webp": lambda: encode(photo(seed=10), "WEBP"),
}


def bomb():
    """A PNG that claims 12,000 x 12,000 pixels (over the limit) in a few kB."""
    return encode(Image.new("1", (12000, 12000)), "PNG")


# Broken: every one of these must be dropped, with this reason.
BROKEN = {
    "empty.jpg": (lambda: b"", "empty file"),
    "truncated.jpg": (lambda: encode(photo(seed=11), "JPEG")[:1500], "truncated"),
    "text.jpg": (lambda: b"this is not an image\n" * 20, "not an image"),
    "Thumbs.db": (lambda: b"\xd0\xcf\x11\xe0" + bytes(500), "not an image"),
    "bomb.png": (bomb, "decompression bomb"),
}


def write_files(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in files.items():
        (folder / name).write_bytes(make() if callable(make) else make)
