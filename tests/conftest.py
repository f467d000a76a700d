"""Shared fixtures: real photos from ../shared, images with every defect made with PIL, and a replica of the
Microsoft archive served from 127.0.0.1."""

import contextlib
import functools
import http.server
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED_ZIP = ROOT.parent / "shared" / "data" / "PetImages-180px.zip"
FLOWERS_ZIP = ROOT.parent / "shared" / "data" / "flowers-5-256px.zip"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # as `run` gives the scripts, for those `call` runs here


def pytest_configure(config):
    """One JAX compilation cache for the test run, shared by every JAX process the tests start (xdist workers
    inherit it from the process that starts them): the same network at the same shapes is compiled once, not
    once per run. JAX keys each entry by the program, its devices and flags, so a hit runs what a compile would."""
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="catsdogs-tests-jax-cache-")
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
        os.environ.update(
            JAX_COMPILATION_CACHE_DIR=folder,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )


def pytest_xdist_auto_num_workers(config):
    """How many pytest-xdist workers `-n auto` (pyproject.toml's addopts) starts: one per core, at most 4, as
    each worker starts TensorFlow and most tests start a script or two beside it."""
    return min(len(os.sched_getaffinity(0)), 4)


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


def call(script, *args):
    """Run one of the project's scripts in this process, through its main(), and return what `run` returns: the
    exit status, stdout and stderr. For steps whose own process is not what a test is about, so that
    TensorFlow starts once per test run rather than once per step. Keras's precision policy and Ctrl-C's
    handler, which train.py sets, are put back afterwards."""
    module = importlib.import_module(Path(script).stem)
    keras = sys.modules.get("keras")
    policy = keras.mixed_precision.global_policy() if keras else None
    handler = signal.getsignal(signal.SIGINT)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = module.main([str(a) for a in args])
            code = code if isinstance(code, int) else 0  # as `sys.exit(main())` treats it; train.py's is a dict
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            signal.signal(signal.SIGINT, handler)
            if (keras := sys.modules.get("keras")) is not None:
                keras.mixed_precision.set_global_policy(policy or "float32")
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(), err.getvalue())


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


def pet_photos(zip_path, cls, start, n):
    """n real photos (jpeg bytes) of the shared zip's class folder cls ("Cat" or "Dog"), from the start-th on."""
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(m for m in zf.namelist() if m.startswith(f"PetImages/{cls}/") and m.endswith(".jpg"))
        return [zf.read(m) for m in names[start : start + n]]


def reencoded(jpeg, fmt, mode="RGB"):
    """A real photo saved again in another mode or format (under a .jpg name, as the archive has them)."""
    with Image.open(io.BytesIO(jpeg)) as img:
        return encode(img.convert(mode), fmt)


# kagglecatsanddogs_5340.zip's root files, and its defects in PetImages/: the reason each is dropped.
ARCHIVE_ROOT = {"CDLA-Permissive-2.0.pdf": b"%PDF-1.5\n" + bytes(300), "readme[1].txt": b"Cats and dogs.\r\n"}
ARCHIVE_DEFECTS = {
    "Cat/666.jpg": "empty file",
    "Dog/11702.jpg": "empty file",
    "Cat/Thumbs.db": "not an image",
    "Dog/Thumbs.db": "not an image",
    "Cat/cut.jpg": "truncated",
    "Cat/dup.jpg": "duplicate of Cat/0.jpg",
    "Cat/both.jpg": "same picture in 2 classes",
    "Dog/both.jpg": "same picture in 2 classes",
}


def write_microsoft_replica(zip_path, shared):
    """A zip shaped like Microsoft's kagglecatsanddogs_5340.zip, made of 62 real photos: a licence and a
    readme beside PetImages/, a Thumbs.db and a zero-length file in Cat/ and Dog/, PNG, BMP, GIF, CMYK and
    grayscale images under .jpg names, a JPEG cut short, a copy and a photo in both classes.
    Cleaned, it holds 30 photos of each class."""
    cats, dogs = pet_photos(shared, "Cat", 0, 32), pet_photos(shared, "Dog", 0, 30)
    files = {f"PetImages/Cat/{i}.jpg": jpeg for i, jpeg in enumerate(cats[:25])}
    files |= {f"PetImages/Dog/{i}.jpg": jpeg for i, jpeg in enumerate(dogs)}
    odd = [("PNG", "RGB"), ("BMP", "RGB"), ("GIF", "P"), ("JPEG", "CMYK"), ("JPEG", "L")]
    files |= {f"PetImages/Cat/{1000 + i}.jpg": reencoded(cats[25 + i], *kind) for i, kind in enumerate(odd)}
    defects = {"666.jpg": b"", "11702.jpg": b"", "cut.jpg": cats[30][: len(cats[30]) // 2]}
    defects |= {"dup.jpg": cats[0], "both.jpg": cats[31]}
    for path in ARCHIVE_DEFECTS:
        cls, name = path.split("/")
        # Thumbs.db: an OLE file of that folder's thumbnails, as Windows writes them
        thumbs = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + cls.encode() * 200
        files[f"PetImages/{path}"] = thumbs if name == "Thumbs.db" else defects[name]
    with zipfile.ZipFile(zip_path, "w") as zf:
        for name, data in {**ARCHIVE_ROOT, **files}.items():
            zf.writestr(name, data)
    return zip_path


class Server(http.server.ThreadingHTTPServer):
    """Serves one folder on 127.0.0.1 and notes the path of every GET."""

    def __init__(self, folder):
        self.requests = []
        handler = functools.partial(Handler, directory=str(folder))
        super().__init__(("127.0.0.1", 0), handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, name):
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


# urllib would send even 127.0.0.1 to a proxy named in the environment
NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}


@pytest.fixture(scope="session")
def archive_server(shared_zip, tmp_path_factory):
    """The replica of the Microsoft archive, served as http://127.0.0.1:PORT/kagglecatsanddogs_5340.zip."""
    folder = tmp_path_factory.mktemp("served")
    write_microsoft_replica(folder / "kagglecatsanddogs_5340.zip", shared_zip)
    server = Server(folder)
    yield server
    server.shutdown()


@pytest.fixture(scope="session")
def readme_project(archive_server, tmp_path_factory):
    """A folder where the README's first step ran on the replica: `python prepare_data.py`, with --source
    pointing at the local server instead of Microsoft's (the same download path: get_file into data/)."""
    project = tmp_path_factory.mktemp("project")
    url = archive_server.url("kagglecatsanddogs_5340.zip")
    result = run("prepare_data.py", "--source", url, cwd=project, env=NO_PROXY)
    assert result.returncode == 0, result.stderr
    return project, result


@pytest.fixture(scope="session")
def small_split(readme_project):
    """The split of the replica of the Microsoft archive: 30 real photos per class (24/3/3)."""
    return readme_project[0] / "data" / "processed"


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
