"""Move the files that block training out of the way, never deleting anything: each into
``root/_quarantine/<kind>/<its relative path>``, with every move recorded in ``root/_quarantine/manifest.json``.

`fit`, `doctor` and `predict` pass over `_quarantine` (see `paths.is_ignored`), so a quarantined file is out
of the dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..files import atomic_write_json
from .findings import DoctorReport
from .paths import QUARANTINE_DIR, outside, relative

MANIFEST = "manifest.json"


def quarantine(report: DoctorReport) -> list[dict[str, str]]:
    """Move every blocking file or folder into ``root/_quarantine/<kind>/<its relative path>`` and append
    each move to ``root/_quarantine/manifest.json``. Nothing is deleted, nothing outside the root is
    touched (a link is moved, never its target). Returns the moves (also kept in `report.quarantined`)."""
    root = report.root
    moves = []
    # files before folders, so that an emptied class folder moves after its files
    targets = sorted({(f.path, f.kind): f for f in report.blocking if f.path not in ("", ".")}.values(),
                     key=lambda f: (os.path.isdir(root / f.path) and not os.path.islink(root / f.path), f.path))
    moved: set[str] = set()
    for f in targets:
        source = root / f.path
        if f.path in moved or not os.path.lexists(source) or outside(source.parent, root):
            continue
        destination = _free_path(root / QUARANTINE_DIR / f.kind / f.path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(source), os.fspath(destination))
        moved.add(f.path)
        moves.append({"from": f.path, "to": relative(destination, root), "kind": f.kind, "message": f.message,
                      "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    if moves:
        _append_manifest(root / QUARANTINE_DIR / MANIFEST, moves)
    report.quarantined = moves
    return moves


def _free_path(path: Path) -> Path:
    candidate, n = path, 1
    while os.path.lexists(candidate):
        candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        n += 1
    return candidate


def _append_manifest(path: Path, moves: list[dict[str, str]]) -> None:
    data: dict[str, Any] = {"format": "finetune.quarantine", "version": 1, "moves": []}
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            path.rename(_free_path(path.with_name("manifest.damaged.json")))  # keep it, start a new one
    data.setdefault("moves", []).extend(moves)
    atomic_write_json(path, data)  # ensure_ascii: any file name fits, even one that is not UTF-8


