"""Sources shaped like the ones people hand over: whatever lies beside the photos (a licence, a readme,
__MACOSX/, .DS_Store, .ipynb_checkpoints/, notebooks, the data a folder or two down) never makes a class
or hides one. Each layout is built of real photos and prepared; its classes and counts are checked exactly."""

import json
import zipfile

import pytest

import prepare_data
from conftest import ARCHIVE_DEFECTS, ARCHIVE_ROOT, NO_PROXY, flower_photos, pet_photos, run, write_files

APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00" + bytes(74)  # the header of a macOS ._name twin
NOTEBOOK = b'{"cells": [], "nbformat": 4}'


@pytest.fixture(scope="module")
def pets(shared_zip):
    return {cls: pet_photos(shared_zip, cls, 100, 6) for cls in ("Cat", "Dog")}


@pytest.fixture(scope="module")
def flowers(flowers_zip):
    return flower_photos(flowers_zip, 5)


def prep(source, out):
    """prepare_data.py in this process, each class cut 3/1/1 from 5 photos."""
    args = ["--source", str(source), "--out", str(out), "--val-fraction", "0.2", "--test-fraction", "0.2"]
    return prepare_data.prepare(prepare_data.parse_args(args))


def counts(report):
    return {c["name"]: (c["folder"], c["images"]) for c in report["classes"]}


def zip_folder(folder, zip_path):
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, path.relative_to(folder).as_posix())
    return zip_path


def project_folder(root, pets):
    """A project: README.md, LICENSE, notes and a notebook beside data/, the archive two folders down,
    with its licence and readme beside PetImages/, and a docs/ folder of non-images beside the classes."""
    write_files(root, {"README.md": b"# my pets\n", "LICENSE": b"MIT\n", "notes.txt": b"todo\n", "a.ipynb": NOTEBOOK})
    pet = root / "data" / "raw"
    write_files(pet, ARCHIVE_ROOT)
    for cls in ("Cat", "Dog"):
        write_files(pet / "PetImages" / cls, {f"{i}.jpg": p for i, p in enumerate(pets[cls][:5])})
        write_files(pet / "PetImages" / cls, {"Thumbs.db": b"\xd0\xcf\x11\xe0" + cls.encode() * 50})
    write_files(pet / "PetImages" / "docs", {"guide.pdf": b"%PDF-1.5\n", "sizes.csv": b"a,b\n"})
    skipped = ["LICENSE", "README.md", "a.ipynb", "notes.txt", "data/raw/CDLA-Permissive-2.0.pdf"]
    skipped += ["data/raw/PetImages/docs/guide.pdf", "data/raw/PetImages/docs/sizes.csv", "data/raw/readme[1].txt"]
    return root, {"cat": ("cats", 5), "dog": ("dogs", 5)}, {p: "not in a class folder" for p in skipped}


def macos_zip(root, flowers):
    """A zip made by macOS's Compress: __MACOSX/ twins of every photo, and .DS_Store files."""
    top = root / "tree"
    for name, jpegs in flowers.items():
        write_files(top / "flowers" / name, {f"{name}{i}.jpg": p for i, p in enumerate(jpegs)})
        write_files(top / "__MACOSX" / "flowers" / name, {f"._{name}{i}.jpg": APPLEDOUBLE for i in range(5)})
        write_files(top / "flowers" / name, {".DS_Store": bytes(64)})
    write_files(top / "flowers", {".DS_Store": bytes(64)})
    write_files(top / "__MACOSX", {"._flowers": APPLEDOUBLE})
    skipped = {p.relative_to(top).as_posix(): "hidden" for p in top.rglob(".DS_Store")}
    skipped |= {p.relative_to(top).as_posix(): "macOS resource fork (__MACOSX)" for p in top.rglob("._*")}
    return zip_folder(top, root / "flowers.zip"), {name: (name, 5) for name in flowers}, skipped


def jupyter_folder(root, flowers):
    """A Colab/Jupyter working folder: .ipynb_checkpoints/ beside and inside the class folders (one holding
    copies of photos), a notebook, and a hidden folder of images."""
    top = root / "work"
    for name, jpegs in list(flowers.items())[:3]:
        write_files(top / "my photos" / name, {f"{i}.jpg": p for i, p in enumerate(jpegs)})
    first = next(iter(flowers))
    write_files(top / "my photos" / first / ".ipynb_checkpoints", {"0-checkpoint.jpg": flowers[first][0]})
    write_files(top / "my photos" / ".ipynb_checkpoints", {"x.jpg": flowers["tulips"][0]})
    write_files(top / ".ipynb_checkpoints", {"explore-checkpoint.ipynb": NOTEBOOK})
    write_files(top / ".thumbnails" / "big", {f"{i}.jpg": p for i, p in enumerate(flowers["tulips"])})
    write_files(top, {"explore.ipynb": NOTEBOOK})
    hidden = [p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file() and "/." in f"/{p.relative_to(top)}"]
    expected = {name: (name, 5) for name in list(flowers)[:3]}
    return top, expected, {**{p: "hidden" for p in hidden}, "explore.ipynb": "not in a class folder"}


LAYOUTS = {
    "project folder, archive two folders down": (project_folder, "pets"),
    "zip made on macOS": (macos_zip, "flowers"),
    "Jupyter folder": (jupyter_folder, "flowers"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_gives_exactly_its_classes_and_counts(layout, request, tmp_path):
    build, photos = LAYOUTS[layout]
    source, expected, skipped = build(tmp_path, request.getfixturevalue(photos))
    report = prep(source, tmp_path / "out")
    assert counts(report) == expected
    assert {s["path"]: s["reason"] for s in report["skipped"]} == skipped
    written = {p.parent.name for p in (tmp_path / "out").rglob("*.jpg")}
    assert written == {folder for folder, _ in expected.values()}, "a folder that is not a class was written"
    reasons = {d["path"]: d["reason"] for d in report["dropped"]}
    assert all(r == "not an image" for p, r in reasons.items() if p.endswith("Thumbs.db"))
    assert len(reasons) == (2 if build is project_folder else 0)


def test_the_archive_as_a_folder_and_as_a_zip_agree(pets, tmp_path):
    folder, _, _ = project_folder(tmp_path / "project", pets)
    from_folder = prep(folder / "data", tmp_path / "a")
    from_zip = prep(zip_folder(folder, tmp_path / "p.zip"), tmp_path / "b")
    assert counts(from_folder) == counts(from_zip) == {"cat": ("cats", 5), "dog": ("dogs", 5)}
    assert from_folder["splits"] == from_zip["splits"]


@pytest.mark.parametrize(
    "files, message",
    [
        ({"Cat/a.jpg": 0, "Dog/b.jpg": 1, "c.jpg": 2, "notes.txt": None}, "1 image(s) of {src} lie loose beside"),
        ({"PetImages/Cat/a.jpg": 0, "PetImages/Cat/b.jpg": 1, "LICENSE": None}, "only the class folder PetImages/Cat/"),
        ({"a.jpg": 0, "b.jpg": 1}, "has no class folders"),
        ({"README.md": None, "docs/guide.pdf": None}, "no images found in {src}"),
    ],
    ids=["loose image", "one class", "no folders", "no images"],
)
def test_a_layout_still_ambiguous_is_refused_in_one_line(pets, tmp_path, files, message):
    src = tmp_path / "src"
    for path, i in files.items():
        write_files((src / path).parent, {(src / path).name: b"text" if i is None else pets["Cat"][i]})
    result = run("prepare_data.py", "--source", src, "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message.format(src=src) in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_readme_first_command_prepares_the_microsoft_archive(readme_project, archive_server, monkeypatch):
    """`python prepare_data.py` on a replica of kagglecatsanddogs_5340.zip, downloaded from 127.0.0.1 by
    get_file into data/downloads (the same code path as Microsoft's URL). test_train.py trains on the split
    this made, plots and predicts (the README's next commands)."""
    project, result = readme_project
    report = json.loads((project / "data" / "processed" / "report.json").read_text())
    assert counts(report) == {"cat": ("cats", 30), "dog": ("dogs", 30)}  # PNG/BMP/GIF/CMYK/gray under .jpg kept
    assert report["splits"] == {s: {"cats": n, "dogs": n} for s, n in (("train", 24), ("val", 3), ("test", 3))}
    expected = {f"PetImages/{p}": r.replace("Cat/0", "PetImages/Cat/0") for p, r in ARCHIVE_DEFECTS.items()}
    assert {d["path"]: d["reason"] for d in report["dropped"]} == expected
    assert report["skipped"] == [{"path": name, "reason": "not in a class folder"} for name in sorted(ARCHIVE_ROOT)]
    served = archive_server.url("kagglecatsanddogs_5340.zip")
    cached = project / "data" / "downloads" / "kagglecatsanddogs_5340.zip"
    assert zipfile.is_zipfile(cached) and "Downloading data from" in result.stdout
    assert archive_server.requests == ["/kagglecatsanddogs_5340.zip"]
    monkeypatch.chdir(project)  # a second run, into another folder, reads the cache: no second request
    for key, value in NO_PROXY.items():
        monkeypatch.setenv(key, value)
    again = prepare_data.prepare(prepare_data.parse_args(["--source", served, "--out", "data/again", "--seed", "7"]))
    assert archive_server.requests == ["/kagglecatsanddogs_5340.zip"]
    assert counts(again) == counts(report) and again["dropped"] == report["dropped"]
