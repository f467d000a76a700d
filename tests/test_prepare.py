"""prepare_data.py: cleaning, duplicates, the split and its report, downloads, re-runs."""

import contextlib
import hashlib
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import prepare_data
import utils.sources
from conftest import BROKEN, ROOT, VALID, encode, photo, run, write_files


def prep(*args):
    return prepare_data.prepare(prepare_data.parse_args([str(a) for a in args]))


def files_under(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def split_names(out):
    return {
        s: {c: sorted(p.name for p in (out / s / c).glob("*")) for c in ("cats", "dogs")}
        for s in ("train", "val", "test")
    }


@pytest.fixture
def messy_source(tmp_path):
    """PetImages/ with every valid oddity and every defect in Cat/, plain photos in Dog/,
    a duplicate inside Cat/, and one picture under both classes."""
    src = tmp_path / "PetImages"
    write_files(src / "Cat", {**VALID, **{n: m for n, (m, _) in BROKEN.items()}})
    dup = encode(photo(seed=50), "JPEG")
    shared = encode(photo(seed=51), "JPEG")
    write_files(src / "Cat", {"dup_a.jpg": dup, "dup_b.jpg": dup, "both.jpg": shared})
    write_files(src / "Dog", {f"{i}.jpg": encode(photo(seed=100 + i), "JPEG") for i in range(10)})
    write_files(src / "Dog", {"both.jpg": shared})
    return src


def test_cleaning_keeps_every_image_and_drops_every_defect(messy_source, tmp_path):
    before = files_under(messy_source)
    out = tmp_path / "out"
    report = prep("--source", messy_source, "--out", out, "--workers", "2")
    reasons = {d["path"]: d["reason"] for d in report["dropped"]}
    expected_cats = len(VALID) + 1  # the duplicate pair counts once; "both" is dropped
    assert report["kept"] == expected_cats + 10
    assert sum(report["splits"][s]["cats"] for s in report["splits"]) == expected_cats
    assert sum(report["splits"][s]["dogs"] for s in report["splits"]) == 10
    for name, (_, reason) in BROKEN.items():
        assert reasons[f"Cat/{name}"] == reason
    assert reasons["Cat/dup_b.jpg"] == "duplicate of Cat/dup_a.jpg"
    assert reasons["Cat/both.jpg"] == reasons["Dog/both.jpg"] == "same picture in 2 classes"
    assert len(reasons) == len(BROKEN) + 3
    assert files_under(messy_source) == before, "the source was modified"
    written = [p for p in out.rglob("*") if p.is_file() and p.name != "report.json"]
    assert len(written) == report["kept"]
    import tensorflow as tf

    for path in written:
        assert path.suffix == ".jpg"
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= 180
        assert tf.io.decode_jpeg(path.read_bytes()).shape[-1] == 3
    assert json.loads((out / "report.json").read_text())["splits"] == report["splits"]


def test_zip_source_and_names_that_collide(tmp_path):
    zpath = tmp_path / "src.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("PetImages/Cat/1.jpg", encode(photo(seed=1), "JPEG"))
        zf.writestr("PetImages/Cat/1.png", encode(photo(seed=2), "PNG"))  # both would be 1.jpg
        zf.writestr("PetImages/Cat/Thumbs.db", b"junk")
        zf.writestr("PetImages/Dog/2.JPG", encode(photo(seed=3), "JPEG"))
    out = tmp_path / "out"
    report = prep("--source", zpath, "--out", out, "--val-fraction", "0", "--test-fraction", "0")
    first, second = split_names(out)["train"]["cats"]
    assert first.startswith("1-") and second == "1.jpg"
    assert split_names(out)["train"]["dogs"] == ["2.jpg"]
    assert report["dropped"] == [{"path": "PetImages/Cat/Thumbs.db", "reason": "not an image"}]


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """101 cats and 57 dogs, all distinct."""
    src = tmp_path_factory.mktemp("many")
    write_files(src / "Cat", {f"c{i}.jpg": encode(photo((40, 40), seed=i), "JPEG") for i in range(101)})
    write_files(src / "dog", {f"d{i}.jpg": encode(photo((40, 40), seed=1000 + i), "JPEG") for i in range(57)})
    return src


def make_split(src, out, *flags):
    prep("--source", src, "--out", out, "--workers", "2", *flags)
    return split_names(out)


def test_split_is_disjoint_stratified_complete_and_seeded(many, tmp_path):
    a = make_split(many, tmp_path / "a", "--seed", "1")
    for cls, total in (("cats", 101), ("dogs", 57)):
        names = [n for s in a for n in a[s][cls]]
        assert len(names) == len(set(names)) == total, "a picture is lost or in two splits"
        assert len(a["val"][cls]) == round(total * 0.1) and len(a["test"][cls]) == round(total * 0.1)
    assert make_split(many, tmp_path / "b", "--seed", "1") == a, "same seed, different split"
    assert make_split(many, tmp_path / "c", "--seed", "2") != a, "the seed has no effect"
    bytes_a, bytes_b = files_under(tmp_path / "a"), files_under(tmp_path / "b")
    bytes_a.pop("report.json"), bytes_b.pop("report.json")
    assert bytes_a == bytes_b, "same seed, different file contents"


def test_limit_keeps_n_per_class_after_cleaning(many, tmp_path):
    (tmp_path / "src").mkdir()
    src = tmp_path / "src"
    for cls in ("Cat", "dog"):
        (src / cls).mkdir()
        for p in (many / cls).iterdir():
            (src / cls / p.name).write_bytes(p.read_bytes())
    write_files(src / "Cat", {f"bad{i}.jpg": b"" for i in range(30)})
    out = make_split(src, tmp_path / "out", "--limit", "20", "--val-fraction", "0.25", "--test-fraction", "0.25")
    assert {c: sum(len(out[s][c]) for s in out) for c in ("cats", "dogs")} == {"cats": 20, "dogs": 20}
    assert len(out["val"]["cats"]) == 5 and len(out["train"]["dogs"]) == 10


def test_second_run_does_nothing_and_new_flags_replace_the_split(many, tmp_path):
    out = tmp_path / "out"
    first = run("prepare_data.py", "--source", many, "--out", out, "--limit", "10")
    assert first.returncode == 0, first.stderr
    stamp = (out / "report.json").stat().st_mtime_ns
    again = run("prepare_data.py", "--source", many, "--out", out, "--limit", "10")
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert (out / "report.json").stat().st_mtime_ns == stamp
    other = run("prepare_data.py", "--source", many, "--out", out, "--limit", "12")
    assert other.returncode == 0
    assert sum(len(v) for s in split_names(out).values() for v in s.values()) == 24
    assert not list(tmp_path.glob(".out.*")), "temporary folders were left behind"


def processes_naming(path):
    """PIDs of the processes whose command line names path (Linux's /proc; none elsewhere)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(path).encode() in cmdline.read_bytes().split(b"\0"):
                found.append(int(cmdline.parent.name))
    return found


def test_kill_9_at_any_point_leaves_the_old_split_or_the_new_one(many, tmp_path):
    out = tmp_path / "out"
    assert run("prepare_data.py", "--source", many, "--out", out, "--limit", "10").returncode == 0
    old = files_under(out)
    command = [sys.executable, str(ROOT / "prepare_data.py"), "--source", str(many), "--out", str(out)]
    new = None
    for delay in (0.2, 0.5, 0.8, 1.1, 1.4, 1.7, 2.0, 3.0):
        proc = subprocess.Popen(
            [*command, "--limit", "20"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        proc.kill()
        proc.wait()
        prepare_data.recover(out)  # what the next run does first
        now = files_under(out)
        if now != old:
            new = new or now
            assert now == new, f"killed after {delay} s: a split that is neither the old nor the new one"
            assert sum(1 for name in now if name.endswith(".jpg")) == 40
    # the killed runs' decoding workers end too, instead of waiting for work forever
    deadline = time.monotonic() + 10
    while processes_naming(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_naming(out), "worker processes of the killed runs live on"
    # the next run takes over a killed run's lock file, and removes it when it ends
    assert run("prepare_data.py", "--source", many, "--out", out, "--limit", "20").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "leftovers of killed runs remain"


def test_url_source_is_downloaded_once_into_the_cache(many, tmp_path, monkeypatch):
    zpath = tmp_path / "kagglecatsanddogs_5340.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for cls in ("Cat", "dog"):
            for p in sorted((many / cls).glob("*.jpg"))[:15]:
                zf.write(p, f"PetImages/{p.parent.name}/{p.name}")
    monkeypatch.setattr(utils.sources, "DOWNLOAD_DIR", tmp_path / "cache" / "downloads")
    report = prep("--source", zpath.as_uri(), "--out", tmp_path / "out")
    cached = tmp_path / "cache" / "downloads" / "kagglecatsanddogs_5340.zip"
    assert report["kept"] == 30
    assert hashlib.sha256(cached.read_bytes()).digest() == hashlib.sha256(zpath.read_bytes()).digest()


def test_a_cut_short_download_in_the_cache_is_named(tmp_path, monkeypatch):
    cached = tmp_path / "cache" / "downloads" / "kagglecatsanddogs_5340.zip"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"PK\x03\x04" + bytes(100))  # the first bytes of a zip, as a killed download leaves them
    monkeypatch.setattr(utils.sources, "DOWNLOAD_DIR", tmp_path / "cache" / "downloads")
    with pytest.raises(prepare_data.UserError, match="is not a whole zip; delete it and run again"):
        prep("--source", "http://127.0.0.1:9/kagglecatsanddogs_5340.zip", "--out", tmp_path / "out")


def test_offline_download_fails_in_one_line_naming_source(tmp_path):
    result = run(
        "prepare_data.py",
        "--source",
        "http://127.0.0.1:9/kagglecatsanddogs_5340.zip",
        "--out",
        tmp_path / "out",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--source" in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: could not download")


@pytest.mark.parametrize("source, message", [("missing.zip", "does not exist"), ("empty", "no files found")])
def test_bad_sources_fail_in_one_line(tmp_path, source, message):
    (tmp_path / "empty").mkdir()
    result = run("prepare_data.py", "--source", tmp_path / source, "--out", tmp_path / "out")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_real_archive_duplicates_are_dropped(shared_zip, tmp_path):
    classes, files, skipped = prepare_data.read_source(shared_zip)
    assert classes == [("cat", "cats"), ("dog", "dogs")] and skipped == []
    digests = [prepare_data.hash_file(w)[0] for _, _, w in files]
    drop = prepare_data.find_duplicates(files, digests)
    both = [p for p, r in drop.items() if r == "same picture in 2 classes"]
    assert len(files) == 22998
    assert len(both) == 2 and {p.split("/")[1] for p in both} == {"Cat", "Dog"}
    assert len(set(digests)) == len(files) - len(drop) + 1  # the cross-class picture is gone from both
