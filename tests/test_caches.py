"""`finetune cache list|clear` and the budgets: every cache is listed, cleared, and pruned least recently used
first after a write."""

import os

import pytest

from finetune import caches
from finetune.cli import main
from finetune.data.doctor import diagnose


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(root))
    (root / "doctor").mkdir(parents=True)
    (root / "decoded" / "abc-64-bicubic").mkdir(parents=True)
    (root / "decoded" / "abc-64-bicubic" / "images.bin").write_bytes(b"x" * 5000)
    (root / "tf_efficientnet_lite0.safetensors").write_bytes(b"w" * 3000)
    for i in range(4):  # doctor files, oldest first
        path = root / "doctor" / f"{i}.json"
        path.write_bytes(b"{}" * 500)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    return root


def test_prune_drops_the_least_recently_used_and_keeps_the_one_just_written(cache, monkeypatch):
    monkeypatch.setitem(caches.KINDS, "doctor", caches.Kind("doctor", "checks", 2500))
    keep = cache / "doctor" / "0.json"  # the oldest, but the one being written
    assert caches.prune("doctor", keep=keep) == 2000
    assert sorted(p.name for p in (cache / "doctor").iterdir()) == ["0.json", "3.json"]
    assert caches.prune("weights") == 0 and (cache / "tf_efficientnet_lite0.safetensors").is_file()  # no budget


def test_list_and_clear(cache, capsys):
    assert main(["cache", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(kind in listing for kind in ("weights", "doctor", "decoded")) and str(cache) in listing
    assert [e.bytes for e in caches.entries("decoded")] == [5000]
    assert main(["cache", "clear", "doctor", "decoded"]) == 0
    assert "9 kB freed" in capsys.readouterr().out  # 4,000 of doctor checks and 5,000 of decoded images
    assert caches.entries("doctor") == caches.entries("decoded") == []
    assert [e.path.name for e in caches.entries("weights")] == ["tf_efficientnet_lite0.safetensors"]
    assert main(["cache", "clear", "thumbnails"]) == 2
    assert "KIND thumbnails" in capsys.readouterr().err


def test_the_doctor_prunes_its_cache_after_writing(cache, monkeypatch, image_folder, tmp_path):
    monkeypatch.setitem(caches.KINDS, "doctor", caches.Kind("doctor", "checks", 1500))
    diagnose(image_folder(tmp_path / "data", per_class=2))
    left = sorted(caches.entries("doctor"), key=lambda e: e.used)
    assert len(left) <= 2 and left[-1].path.name not in {f"{i}.json" for i in range(4)}  # the new one stays
