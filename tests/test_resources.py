"""The machine's limits: a full disk, a second run into the same folder, a zip bomb, too little memory.

Disks are real: small tmpfs mounts (the tests need root to mount them, as CI has).
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest

from conftest import ROOT, TINY, call, run
from utils.config import LITERT_FILE, MAX_FILE_BYTES, MODEL_FILE


@pytest.fixture
def small_disk(tmp_path):
    """make(size): a real filesystem of that size (tmpfs), unmounted after the test."""
    mounts = []

    def make(size):
        folder = tmp_path / f"disk-{size}"
        folder.mkdir()
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True)
        if mount.returncode:
            pytest.skip(f"cannot mount a small tmpfs here ({mount.stderr.decode().strip()}); CI runs as root and can")
        mounts.append(folder)
        return folder

    yield make
    for folder in mounts:
        subprocess.run(["umount", "-l", folder], check=False)


def one_error_line(result):
    """The one error line of a run (progress lines may stand beside it), with no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def hidden_files(folder):
    return sorted(p.name for p in folder.rglob(".*"))


# --- a full disk ----------------------------------------------------------------
def test_prepare_refuses_a_disk_too_small_and_keeps_the_previous_split(real_photos, small_disk):
    disk = small_disk("400k")
    out = disk / "split"
    first = run("prepare_data.py", "--source", real_photos.parent, "--out", out, "--limit", "10")
    assert first.returncode == 0, first.stderr
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    full = run("prepare_data.py", "--source", real_photos.parent, "--out", out, "--limit", "40")
    assert full.returncode == 2
    line = one_error_line(full)
    assert f"the disk of {disk} is full" in line and "needs about" in line and "is free" in line
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, "the previous split was touched"
    assert hidden_files(disk) == [], "temporary files were left behind"


def test_prepare_that_fills_the_disk_while_writing_removes_its_temporary_folder(
    real_photos, small_disk, monkeypatch, capsys
):
    """The checks before writing are skipped, so the real filesystem runs out halfway through."""
    import prepare_data

    disk = small_disk("200k")
    monkeypatch.setattr(prepare_data, "check_space", lambda folder, need: None)
    with pytest.raises(SystemExit) as exit_:
        prepare_data.main(["--source", str(real_photos.parent), "--out", str(disk / "split"), "--limit", "40"])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and f"the disk of {disk} is full" in err[0]
    assert list(disk.iterdir()) == [], "half a split was left on the full disk"


def test_train_refuses_at_the_start_when_its_files_cannot_fit(small_disk, tmp_path, small_split):
    disk = small_disk("3m")
    result = call("train.py", "--data", small_split, "--out", disk / "models", *TINY)
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"the disk of {disk / 'models'} is full" in line
    assert hidden_files(disk) == []


def fill_while_running(ballast, proc, leave, timeout=240):
    """Grow ballast until about `leave` bytes of its disk are free, and keep it there while proc runs.

    The run writes and deletes its backups meanwhile, so a single fill could lose a race with it: stop
    short while a backup's temporary copy holds space, or fail itself on a disk the run filled first."""
    deadline = time.time() + timeout
    with open(ballast, "wb", buffering=0) as f:
        while proc.poll() is None and time.time() < deadline:
            spare = shutil.disk_usage(ballast.parent).free - leave
            if spare <= 0:
                time.sleep(0.01)
                continue
            try:
                f.write(bytes(min(spare, 16_000_000)))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                f.truncate(max(0, f.seek(0, os.SEEK_END) - leave))  # give the run back its margin
                f.seek(0, os.SEEK_END)


def test_train_stopped_by_a_full_disk_resumes_once_space_is_freed(small_disk, small_split):
    """The disk fills up (another program's file) after the first epoch; the run stops with one
    line, leaves no temporary file, and --resume finishes it with every epoch once."""
    disk = small_disk("200m")  # room for the resumed run's files, however many epochs the first one saved
    out = disk / "models"
    args = ["--data", small_split, "--out", out, "--epochs", "4", "--batch-size", "4", "--image-size", "32"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = out / ".run" / "log.csv"
    deadline = time.time() + 240
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    ballast = disk / "ballast"
    fill_while_running(ballast, proc, leave=2_000_000)  # less than a backup of the weights
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 2, (stdout, stderr)
    line = one_error_line(subprocess.CompletedProcess(args, 2, stdout, stderr))
    assert f"the disk of {out}" in line and "--resume" in line
    assert [p.name for p in out.rglob(".*.h5")] == [] and not (out / MODEL_FILE).exists()

    ballast.unlink()
    resumed = call("train.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((out / "history.json").read_text())
    assert len(history["val_accuracy"]) == 4 and history["elapsed_seconds"] == sorted(history["elapsed_seconds"])
    assert (out / MODEL_FILE).exists() and (out / LITERT_FILE).exists()


@pytest.mark.parametrize("script", ["plot_history.py", "predict.py"])
def test_plots_on_a_full_disk_say_so_in_one_line(script, small_disk, tmp_path):
    from conftest import encode, photo

    disk = small_disk("64k")
    (disk / "ballast").write_bytes(bytes(60_000))
    if script == "plot_history.py":
        history = disk / "history.json"
        history.write_text(json.dumps({k: [0.5, 0.6] for k in ("accuracy", "val_accuracy", "loss", "val_loss")}))
        result = run(script, history)
    else:
        (tmp_path / "cat.jpg").write_bytes(encode(photo(), "JPEG"))
        result = run(script, tmp_path / "cat.jpg", "--model", ROOT / "models" / MODEL_FILE, "--show", disk / "g.png")
    assert result.returncode == 2
    assert f"the disk of {disk} is full" in one_error_line(result)
    assert sorted(p.name for p in disk.iterdir()) == ["ballast"] + (["history.json"] if "plot" in script else [])


# --- two runs at once --------------------------------------------------------------
def wait_for_lock(lock, proc, timeout=120):
    deadline = time.time() + timeout
    while not (lock.exists() and lock.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    return lock.read_text().strip()


def test_a_second_train_into_the_same_out_refuses_and_a_killed_one_blocks_nothing(small_split, tmp_path):
    out = tmp_path / "models"
    args = ["--data", small_split, "--out", out, *TINY]
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, args), "--epochs", "50"],  # the last --epochs counts
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_lock(out / ".lock", first) == str(first.pid)
        second = call("train.py", *args)
        assert second.returncode == 2
        assert f"--out {out} is in use by another run (process {first.pid})" in one_error_line(second)
        assert first.poll() is None, "the second run disturbed the first"
    finally:
        first.kill()
        first.wait()
    after = call("train.py", *args)
    assert after.returncode == 0, after.stderr
    assert not (out / ".lock").exists()


def test_a_second_prepare_into_the_same_out_refuses(shared_zip, real_photos, tmp_path):
    out = tmp_path / "processed"
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "prepare_data.py"), "--source", shared_zip, "--out", out],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_lock(tmp_path / ".processed.lock", first) == str(first.pid)
        second = run("prepare_data.py", "--source", real_photos.parent, "--out", out, "--limit", "3")
        assert second.returncode == 2
        assert f"(process {first.pid})" in one_error_line(second)
    finally:
        first.kill()
        first.wait()
    after = run("prepare_data.py", "--source", real_photos.parent, "--out", out, "--limit", "10")
    assert after.returncode == 0, after.stderr


# --- zip bombs ---------------------------------------------------------------------
def test_zip_bomb_members_are_dropped_with_flat_memory(real_photos, tmp_path):
    """A member that inflates to 4x the limit (its header says so) and one whose header lies
    about its size are dropped with their reason; the photos beside them are kept."""
    bomb = tmp_path / "bomb.zip"
    zeros = bytes(1 << 20)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        for cls in ("Cat", "Dog"):
            for p in sorted((real_photos / cls).iterdir())[:3]:
                zf.write(p, f"PetImages/{cls}/{p.name}")
        with zf.open("PetImages/Dog/bomb.jpg", "w", force_zip64=True) as member:
            for _ in range(4 * MAX_FILE_BYTES // len(zeros)):
                member.write(zeros)
        zf.writestr("PetImages/Cat/liar.jpg", bytes(8 * MAX_FILE_BYTES // 4))
    lie_about_size(bomb, "PetImages/Cat/liar.jpg", 1000)
    assert bomb.stat().st_size < 2 * 2**20

    # peak memory of prepare_data.py and its workers, measured by a parent that runs nothing else
    command = [sys.executable, str(ROOT / "prepare_data.py"), "--source", str(bomb), "--out", str(tmp_path / "out")]
    command += ["--val-fraction", "0", "--test-fraction", "0"]  # 3 photos a class: all for training
    measure = (
        "import resource, subprocess, sys; "
        f"r = subprocess.run({command!r}, capture_output=True, text=True); "
        "sys.stderr.write(r.stderr); print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    result = subprocess.run([sys.executable, "-c", measure], capture_output=True, text=True, timeout=300)
    code, peak_kb = map(int, result.stdout.split())
    assert code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    reasons = {d["path"]: d["reason"] for d in report["dropped"]}
    assert reasons["PetImages/Dog/bomb.jpg"].startswith("larger than 64 MB")
    assert "PetImages/Cat/liar.jpg" in reasons
    assert report["kept"] == 6
    # every process of the run stayed far below one inflated member (256 MB)
    assert peak_kb < 200 * 1024, f"peak memory {peak_kb / 1024:.0f} MB"


def lie_about_size(zip_path, name, size):
    """Rewrite the uncompressed size that the zip's headers give for one member."""
    data = bytearray(zip_path.read_bytes())
    with zipfile.ZipFile(zip_path) as zf:
        info = zf.getinfo(name)
    local = info.header_offset
    data[local + 22 : local + 26] = size.to_bytes(4, "little")  # local header: uncompressed size
    central = len(data)
    while (central := data.rfind(b"PK\x01\x02", 0, central)) != -1:  # central directory entries
        name_len = int.from_bytes(data[central + 28 : central + 30], "little")
        if data[central + 46 : central + 46 + name_len] == name.encode():
            data[central + 24 : central + 28] = size.to_bytes(4, "little")
            break
    zip_path.write_bytes(bytes(data))
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.getinfo(name).file_size == size


# --- too little memory -----------------------------------------------------------------
def test_train_refuses_before_loading_when_memory_is_too_small(small_split, tmp_path, monkeypatch, capsys):
    import train
    import utils.images

    monkeypatch.setattr(utils.images, "available_memory", lambda: 1_600_000_000)
    monkeypatch.setattr(utils.images, "load_split", lambda *a: pytest.fail("refused only after loading"))
    with pytest.raises(SystemExit) as exit_:
        train.main(["--data", str(small_split), "--out", str(tmp_path / "m"), "--image-size", "1024"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at 1024 px, 16 a step, needs about" in err[0] and "1.60 GB is available" in err[0]
    assert "lower --image-size (" in err[0]


def test_the_space_estimate_opens_the_zip_once(shared_zip, monkeypatch):
    """It reads 22,998 headers from one open archive (opening it per file took minutes)."""
    import prepare_data

    opened = []
    real = zipfile.ZipFile
    monkeypatch.setattr(prepare_data.zipfile, "ZipFile", lambda *a, **k: opened.append(a) or real(*a, **k))
    _, files, _ = prepare_data.read_source(shared_zip)
    estimate = prepare_data.estimated_output(files, None, 180)  # no --limit, the default --max-side
    assert len(opened) == 2  # read_source's listing, and the estimate's
    assert 20e6 < estimate < 200e6  # a low estimate: the 180 px split really takes 238 MB


def test_a_staged_h5py_writer_that_meets_a_full_disk_gives_one_clean_error(small_disk):
    """Staged writes (h5py files go to memory first) meet a full disk in a plain copy: one DiskFull,
    nothing left behind. (Seen by hand: h5py meeting ENOSPC inside Keras's backup crashed the interpreter.)"""
    staged = True
    disk = small_disk("64k")
    code = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import h5py, numpy as np
from utils.files import DiskFull, atomic_write
def write(path):
    with h5py.File(path, "w") as f:
        f["x"] = np.ones(1_000_000)
try:
    atomic_write({str(disk)!r} + "/w.weights.h5", write, staged={staged})
except DiskFull as e:
    print("DiskFull:", e)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    assert result.stdout.startswith(f"DiskFull: the disk of {disk} is full")
    assert list(disk.iterdir()) == []
