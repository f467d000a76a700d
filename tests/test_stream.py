"""Splits larger than memory: streamed from a cache on disk, with the same batches as in memory; and the
choice of precision by device, and the CPU's name in the logs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import utils.images
from conftest import call
from utils.backend import choose_precision, cpu_has_bf16, cpu_model
from utils.files import UserError

SHORT = ["--epochs", "2", "--batch-size", "16", "--image-size", "64"]


def test_a_streamed_run_trains_exactly_as_one_in_memory(small_split, tmp_path):
    """Same seed: the same batches read from disk instead of memory give the same losses and accuracies."""
    small_split = Path(shutil.copytree(small_split, tmp_path / "split"))  # the cache goes into the split's folder
    runs = {}
    for mode in ("memory", "stream"):
        flags = ["--stream"] if mode == "stream" else []
        result = call("train.py", "--data", small_split, "--out", tmp_path / mode, *SHORT, *flags)
        assert result.returncode == 0, result.stderr
        assert ("streaming the splits" in result.stdout) == (mode == "stream")
        runs[mode] = json.loads((tmp_path / mode / "history.json").read_text())
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert runs["stream"][key] == pytest.approx(runs["memory"][key], rel=1e-5, abs=1e-6), key
    caches = sorted(p.name for p in (small_split / ".cache").iterdir())
    assert [name.split("-")[0] for name in caches] == ["test", "train", "val"]
    size = (small_split / ".cache" / caches[1]).stat().st_size
    assert size == 48 * 64 * 64 * 3  # the 48 training images, 64 x 64 x 3 bytes each

    # a second run reuses the cache, as long as the split's files are the same
    before = {p.name: p.stat().st_mtime_ns for p in (small_split / ".cache").iterdir()}
    again = call("train.py", "--data", small_split, "--out", tmp_path / "again", *SHORT, "--stream")
    assert again.returncode == 0, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (small_split / ".cache").iterdir()} == before


def test_disk_images_read_like_an_array_and_refuse_a_short_file(tmp_path):
    from utils.images import DiskImages

    pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    (tmp_path / "x.u8").write_bytes(pixels.tobytes())
    x = DiskImages(tmp_path / "x.u8", 5, 4)
    assert len(x) == 5 and x.shape == (5, 4, 4, 3)
    assert np.array_equal(x[1:4], pixels[1:4]) and np.array_equal(x[[4, 0, 2]], pixels[[4, 0, 2]])
    (tmp_path / "x.u8").write_bytes(pixels.tobytes()[:-10])  # cut short: the last image is incomplete
    with pytest.raises(UserError, match="cut short"):
        DiskImages(tmp_path / "x.u8", 5, 4)[3:5]


def test_memory_too_small_for_the_splits_streams_instead_of_refusing(monkeypatch):

    counts, size, batch = [60_000, 7_000, 7_000], 160, 64
    streamed_need = batch * size * size * 1000 + 1.5e9
    monkeypatch.setattr(utils.images, "available_memory", lambda: streamed_need + 1e6)  # 10 GB of images do not fit
    assert utils.images.check_memory(counts, size, batch) is False
    monkeypatch.setattr(utils.images, "available_memory", lambda: 64e9)
    assert utils.images.check_memory(counts, size, batch) is True
    assert utils.images.check_memory(counts, size, batch, stream=True) is False  # --stream
    monkeypatch.setattr(utils.images, "available_memory", lambda: streamed_need - 1e6)
    with pytest.raises(UserError, match="even with the images streamed from disk"):
        utils.images.check_memory(counts, size, batch)


@pytest.mark.parametrize(
    ("gpus", "cpu_bf16", "expected"),
    [
        ([], True, "mixed_bfloat16"),  # a CPU with AVX512_BF16 or AMX
        ([], False, "float32"),  # AVX2 only: bfloat16 would be emulated
        ([("Tesla T4", (7, 5))], True, "mixed_float16"),  # Colab: a T4 on a host CPU with bfloat16
        ([("NVIDIA H100", (9, 0))], False, "mixed_float16"),
        ([("Tesla P100", (6, 0))], True, "float32"),  # before tensor cores: float16 is no faster
        ([("NVIDIA A100", (8, 0)), ("Tesla K80", (3, 7))], True, "float32"),  # the slowest card decides
        ([("unknown", None)], True, "float32"),
    ],
)
def test_precision_is_chosen_by_device(gpus, cpu_bf16, expected):
    assert choose_precision(gpus, cpu_bf16) == expected


def test_the_cpu_is_named_by_family_model_and_units_so_two_cpus_of_one_name_differ(tmp_path):
    """Under KVM both AMD EPYCs of these machines are named "AMD EPYC": timings must not be mixed up."""
    facts = {"AVX2 EPYC": ("25", "1", "fpu avx2 fma"), "Zen 5 EPYC": ("26", "2", "avx2 avx512f avx512_bf16 fma")}
    names = {}
    for cpu, (family, model, flags) in facts.items():
        info = tmp_path / cpu
        info.write_text(
            f"processor\t: 0\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: AMD EPYC\n"
            f"flags\t\t: {flags}\n\nprocessor\t: 1\n"
        )
        names[cpu] = cpu_model(info), cpu_has_bf16(info)
    assert names == {
        "AVX2 EPYC": ("AMD EPYC (family 25 model 1; avx2)", False),
        "Zen 5 EPYC": ("AMD EPYC (family 26 model 2; avx2 avx512f avx512_bf16)", True),
    }
