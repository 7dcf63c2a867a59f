"""The dataset doctor on a generated corpus with one example of every finding (scripts/make_doctor_corpus.py)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from PIL import Image, ImageFile
from rich.console import Console

from finetune import cli
from finetune.cli import main
from finetune.data import doctor, filecheck, scan_image_folder
from finetune.data.doctor import KINDS, diagnose, preflight, quarantine
from finetune.errors import DatasetError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_doctor_corpus.py"
_spec = importlib.util.spec_from_file_location("make_doctor_corpus", SCRIPT)
corpus_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus_script)
EXPECTED = sorted(corpus_script.EXPECTED)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_CACHE", str(cache))
    return cache


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The generated corpus; as root, the chmod-0 file is made unreadable by patching the doctor's first read
    (in this process and in the worker processes it forks)."""
    root = corpus_script.make_corpus(tmp_path / "corpus")
    if IS_ROOT:  # root reads any file: make the chmod-0 file fail the way it does for everyone else
        locked = root / corpus_script.PERMISSION_FILE
        real = filecheck._read_head

        def deny(path: Path) -> bytes:
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(filecheck, "_read_head", deny)
    return root


def _found(report: doctor.DoctorReport) -> list[tuple[str, str]]:
    return sorted((f.path, f.kind) for f in report.findings)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_finding_is_reported_with_its_kind_and_nothing_else(corpus: Path, workers: int) -> None:
    report = diagnose(corpus, workers=workers)
    assert _found(report) == EXPECTED
    for f in report.findings:
        assert f.severity == KINDS[f.kind].severity and f.fix == KINDS[f.kind].fix and f.message
    assert not report.ok
    assert report.class_counts["train"]["yellow"] == 3 and report.class_counts["train"]["empty_class"] == 0
    assert report.imbalance_ratio > 3


def test_the_corpus_covers_every_kind_the_issue_lists() -> None:
    issue_kinds = set(KINDS) - {"layout", "unreadable", "ignored_file"}  # the catch-alls of the scan itself
    assert {kind for _, kind in EXPECTED} == issue_kinds


def test_results_are_cached_by_path_size_and_mtime(corpus: Path) -> None:
    first = diagnose(corpus, workers=0)
    second = diagnose(corpus, workers=0)
    assert first.cache_hits == 0
    assert second.cache_hits == first.files - 2  # all but the refused link and non-UTF-8 name, never opened
    assert _found(second) == _found(first)
    good = corpus / "train/red/01.jpg"
    good.write_bytes(good.read_bytes()[:100])  # now truncated: size and mtime change
    third = diagnose(corpus, workers=0)
    assert ("train/red/01.jpg", "truncated") in _found(third)
    assert not diagnose(corpus, workers=0, cache=False).cache_hits


def test_a_clean_folder_passes(tmp_path: Path, image_folder) -> None:
    report = diagnose(image_folder(tmp_path / "clean", per_class=8))
    assert report.findings == [] and report.ok
    assert report.files == 24


def test_cli_json_and_exit_status(corpus: Path, tmp_path: Path, image_folder, capsys: pytest.CaptureFixture) -> None:
    assert main(["doctor", str(corpus), "--json", "--workers", "0"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert sorted((f["path"], f["kind"]) for f in data["findings"]) == EXPECTED
    assert all(set(f) >= {"path", "kind", "severity", "message", "fix"} for f in data["findings"])
    assert data["ok"] is False
    assert data["counts"]["blocking"] == sum(KINDS[kind].severity == "blocking" for _, kind in EXPECTED)
    assert main(["doctor", str(image_folder(tmp_path / "clean")), "--no-progress"]) == 0
    assert "nothing blocks training" in " ".join(capsys.readouterr().out.split())


def test_cli_table_names_files_reasons_and_fixes(
    corpus: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "out", Console(width=250))
    assert main(["doctor", str(corpus), "--no-progress", "--workers", "0"]) == 1
    text = capsys.readouterr().out
    for fragment in ("truncated.jpg", "decompression_bomb", "caf\\xe9.png", "imbalance ratio", "yellow"):
        assert fragment in text


def test_quarantine_moves_blocking_files_and_keeps_everything(corpus: Path) -> None:
    before = _all_files(corpus)
    report = diagnose(corpus, workers=0)
    moves = quarantine(report)
    blocking = {f.path for f in report.blocking}
    assert {m["from"] for m in moves} == blocking and report.ok
    manifest = json.loads((corpus / "_quarantine" / "manifest.json").read_text())
    assert manifest["moves"] == moves
    for move in moves:
        assert not os.path.lexists(corpus / move["from"])
        assert os.path.lexists(corpus / move["to"]) and move["to"].startswith(f"_quarantine/{move['kind']}/")
    assert _all_files(corpus) == before + 1  # moved, never deleted; + the manifest
    assert (corpus.parent / "corpus-outside.jpg").is_file()  # a link is moved, not its target
    again = diagnose(corpus, workers=0)
    assert again.ok and not any(f.path.startswith("_quarantine") for f in again.findings)
    assert scan_image_folder(corpus).classes == ["blue", "green", "red", "yellow"]


def test_bombs_are_refused_from_the_header_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    check = filecheck.check_file(path, max_pixels=1000)
    assert check.issues[0][0] == "decompression_bomb" and not check.readable


def test_preflight_leaves_out_blocking_files_and_names_them(corpus: Path) -> None:
    (corpus / "train/empty_class").rmdir()  # the one blocking problem that stops fit itself
    splits = scan_image_folder(corpus)
    result = preflight(splits, workers=0)
    blocking_files = {p for p, kind in EXPECTED if KINDS[kind].severity == "blocking" and kind != "empty_class"}
    assert {Path(p).relative_to(corpus).as_posix() for p in result.excluded} == blocking_files
    kept = {s.path for s in result.splits.train + result.splits.val}
    assert len(kept) == len(splits.train) + len(splits.val) - len(blocking_files)
    assert not kept & {corpus / p for p in blocking_files}
    assert result.balance.method == "sampler" and result.balance.ratio > 3
    summary = result.to_dict()
    assert json.loads(json.dumps(summary))["excluded"] and summary["warnings"]["leakage"] == 2


def test_preflight_stops_when_too_many_files_are_unusable(corpus: Path) -> None:
    (corpus / "train/empty_class").rmdir()
    with pytest.raises(DatasetError, match=r"cannot be used, more than the 5% allowed") as info:
        preflight(scan_image_folder(corpus), workers=0, max_unusable_fraction=0.05)
    assert "truncated.jpg" in str(info.value) and "finetune doctor" in str(info.value)


def test_preflight_stops_when_a_class_has_no_usable_training_image(tmp_path: Path, make_class_folder) -> None:
    root = make_class_folder(tmp_path / "d", {"cat": 6, "dog": 6, "owl": 3})
    for path in (root / "owl").iterdir():
        path.write_bytes(b"garbage")
    splits = scan_image_folder(root)
    with pytest.raises(DatasetError, match="owl"):
        preflight(splits, workers=0, max_unusable_fraction=0.5)


def test_fit_stops_on_the_corpus_before_quarantine_and_completes_after(corpus: Path, tmp_path: Path) -> None:
    from finetune.train import fit

    kwargs = {"model": "test_efficientnet", "pretrained": False, "epochs": 1, "progress": False, "num_workers": 0,
              "overrides": {"batch_size": 8}}
    with pytest.raises(DatasetError, match="empty_class"):
        fit(corpus, "small-similar", out=tmp_path / "run0", **kwargs)
    quarantine(diagnose(corpus, workers=0))
    result = fit(corpus, "small-similar", out=tmp_path / "run1", **kwargs)
    # the quarantined files and the empty class are gone: nothing left to skip, one class fewer
    assert result.summary["skipped_files"] == 0 and "empty_class" not in result.summary["classes"]
    assert len(result.summary["classes"]) == len(scan_image_folder(corpus).classes)


def test_fit_on_the_corpus_skips_and_names_every_unusable_file(corpus: Path, tmp_path: Path) -> None:
    from finetune.train import fit

    (corpus / "train/empty_class").rmdir()
    result = fit(corpus, "small-similar", model="test_efficientnet", pretrained=False, epochs=1, progress=False,
                 num_workers=0, out=tmp_path / "run", overrides={"batch_size": 8})
    blocking_files = {p for p, kind in EXPECTED if KINDS[kind].severity == "blocking" and kind != "empty_class"}
    skipped = {Path(p).relative_to(corpus).as_posix() for p in result.summary["skipped"]}
    assert skipped == blocking_files and result.summary["skipped_files"] == len(blocking_files)


def _all_files(folder: Path) -> int:
    return sum(len(files) + len([d for d in dirs if os.path.islink(os.path.join(top, d))])
               for top, dirs, files in os.walk(folder))
