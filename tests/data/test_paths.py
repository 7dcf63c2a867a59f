"""The one folder walk shared by fit (folders), doctor and predict."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from finetune.data.paths import QUARANTINE_DIR, is_ignored, relative, walk_files, walk_images

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_walks_everything_below_in_sorted_path_order(tmp_path: Path) -> None:
    files = [tmp_path / name for name in ("b.png", "a/z.jpg", "a/b/c.PNG", "a.jpg", "a b/x.gif", "notes.txt")]
    touch(*files)
    found = list(walk_files(tmp_path))
    assert found == sorted(files)  # the order `sorted()` gives, without sorting afterwards
    assert list(walk_images(tmp_path)) == sorted(p for p in files if p.suffix != ".txt")


def test_hidden_names_and_quarantine_are_passed_over_at_any_depth(tmp_path: Path) -> None:
    kept = tmp_path / "cat" / "a.jpg"
    touch(kept, tmp_path / ".hidden.jpg", tmp_path / ".git" / "b.jpg", tmp_path / "cat" / "._a.jpg",
          tmp_path / QUARANTINE_DIR / "corrupt" / "cat" / "c.jpg", tmp_path / "cat" / QUARANTINE_DIR / "d.jpg")
    assert list(walk_images(tmp_path)) == [kept]
    assert is_ignored(tmp_path / QUARANTINE_DIR) and is_ignored(tmp_path / ".x") and not is_ignored(kept)


def test_the_folder_given_is_walked_whatever_its_name(tmp_path: Path) -> None:
    inside = tmp_path / QUARANTINE_DIR / "corrupt" / "c.jpg"
    touch(inside)
    assert list(walk_images(tmp_path / QUARANTINE_DIR)) == [inside]


def test_links_to_files_are_followed_links_to_folders_are_not(tmp_path: Path) -> None:
    touch(tmp_path / "outside" / "o.jpg", tmp_path / "data" / "cat" / "a.jpg")
    (tmp_path / "data" / "cat" / "link.jpg").symlink_to(tmp_path / "outside" / "o.jpg")
    (tmp_path / "data" / "cat" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    (tmp_path / "data" / "cat" / "elsewhere").symlink_to(tmp_path / "outside", target_is_directory=True)
    found = [relative(p, tmp_path) for p in walk_images(tmp_path / "data")]
    assert found == ["data/cat/a.jpg", "data/cat/link.jpg"]
    (tmp_path / "linked").symlink_to(tmp_path / "data", target_is_directory=True)
    assert [p.name for p in walk_images(tmp_path / "linked")] == ["a.jpg", "link.jpg"]  # the top may be a link


def test_skip_replaces_the_rule_and_sees_folders_before_entering(tmp_path: Path) -> None:
    touch(tmp_path / "keep" / "a.jpg", tmp_path / "drop" / "b.jpg", tmp_path / ".seen" / "c.jpg")
    asked: list[tuple[str, bool]] = []

    def skip(path: Path, is_dir: bool) -> bool:
        asked.append((relative(path, tmp_path), is_dir))
        return path.name == "drop"

    assert [relative(p, tmp_path) for p in walk_files(tmp_path, skip)] == [".seen/c.jpg", "keep/a.jpg"]
    assert asked == [(".seen", True), (".seen/c.jpg", False), ("drop", True), ("keep", True), ("keep/a.jpg", False)]


@pytest.mark.skipif(IS_ROOT, reason="root can list any folder")
def test_a_folder_that_cannot_be_listed_is_passed_over(tmp_path: Path) -> None:
    touch(tmp_path / "a" / "x.jpg", tmp_path / "b" / "y.jpg")
    (tmp_path / "a").chmod(0)
    try:
        assert [p.name for p in walk_files(tmp_path)] == ["y.jpg"]
    finally:
        (tmp_path / "a").chmod(0o755)


def test_operating_system_leftovers_are_never_read(tmp_path):
    """The doctor reports `@eaDir` (Synology thumbnails) and `__MACOSX` as debris that fit ignores: it must."""
    for name in ("cat/a.png", "cat/@eaDir/a.png", "__MACOSX/cat/._a.png", "cat/Thumbs.db"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in walk_files(tmp_path)] == ["cat/a.png"]
