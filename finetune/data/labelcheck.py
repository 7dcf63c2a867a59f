"""The doctor's checks across files: the same picture in several classes (conflicting labels), in train and
in val/test (leakage) or twice in a class (duplicate); and per class: empty, too few images, imbalance.

Exact copies are found by the content digest of `filecheck`, near-identical pictures by its perceptual hash.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from .balance import IMBALANCE_RATIO, imbalance_ratio
from .filecheck import FileCheck
from .findings import MIN_IMAGES_PER_CLASS, Finding, finding
from .layoutcheck import Entry

NEAR_DUPLICATE_BITS = 4
"""Perceptual hashes (64 bits) this close count as the same picture (re-encoded, resized, lightly edited)."""


def label_findings(usable: list[tuple[Entry, FileCheck]]) -> list[Finding]:
    """Exact copies across classes (conflict), across splits (leakage) or within a class (duplicate), and
    near-identical pictures in train and in val/test (leakage)."""
    findings = []
    groups: dict[str, list[Entry]] = defaultdict(list)
    for entry, check in usable:
        if check.digest:
            groups[check.digest].append(entry)
    for copies in groups.values():
        if len(copies) > 1:
            findings += _copy_findings(sorted(copies, key=_split_order))
    exact = {e.rel for copies in groups.values() if len(copies) > 1 for e in copies}
    findings += _near_leakage([(e, c) for e, c in usable if e.rel not in exact and c.phash is not None])
    return findings


def _copy_findings(copies: list[Entry]) -> list[Finding]:
    labels = sorted({e.label for e in copies})
    if len(labels) > 1:
        where = ", ".join(f"{e.rel} ({e.label})" for e in copies)
        return [finding(e.rel, "conflicting_labels", f"byte-identical files in classes {', '.join(labels)}: {where}")
                for e in copies]
    first, findings = copies[0], []
    for e in copies[1:]:
        if e.split != first.split:
            findings.append(finding(e.rel, "leakage", f"identical to {first.split} file {first.rel}"))
        else:
            findings.append(finding(e.rel, "duplicate", f"identical to {first.rel} in the same class"))
    return findings


def _near_leakage(hashed: list[tuple[Entry, FileCheck]]) -> list[Finding]:
    train = [(e, c) for e, c in hashed if e.split == "train"]
    held_out = [(e, c) for e, c in hashed if e.split != "train"]
    if not train or not held_out:
        return []
    train_hashes = np.array([c.phash for _, c in train], dtype=np.uint64)
    findings = []
    for start in range(0, len(held_out), 512):
        chunk = held_out[start : start + 512]
        hashes = np.array([c.phash for _, c in chunk], dtype=np.uint64)
        distance = _popcount(hashes[:, None] ^ train_hashes[None, :])
        nearest = distance.argmin(axis=1)
        for (entry, _), j, row in zip(chunk, nearest, distance, strict=True):
            if row[j] <= NEAR_DUPLICATE_BITS:
                twin = train[j][0]
                findings.append(finding(entry.rel, "leakage", f"near-identical to train file {twin.rel} "
                                        f"(perceptual hash distance {int(row[j])} of 64)"))
    return findings


def _popcount(values: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(values)
    as_bytes = values.view(np.uint8).reshape(*values.shape, 8)
    return np.unpackbits(as_bytes, axis=-1).sum(axis=-1)


def class_counts(good: list[Entry], class_dirs: dict[tuple[str, str], str]) -> dict[str, dict[str, int]]:
    """Usable images per split and class (split -> class -> count); class folders without any count 0."""
    found = Counter((e.split, e.label) for e in good)
    keys = sorted(set(class_dirs) | set(found))
    return {split: {label: found.get((split, label), 0) for s, label in keys if s == split}
            for split in ("train", "val", "test") if any(s == split for s, _ in keys)}


def class_findings(
    entries: list[Entry], good: list[Entry], class_dirs: dict[tuple[str, str], str], counts: dict[str, dict[str, int]]
) -> list[Finding]:
    """Classes with no usable images, with too few, and an imbalance `fit` will correct."""
    findings = []
    files = Counter((e.split, e.label) for e in entries)
    for (split, label), rel in sorted(class_dirs.items()):
        n_files, n_good = files.get((split, label), 0), counts.get(split, {}).get(label, 0)
        if n_files == 0:
            findings.append(finding(rel, "empty_class", f"class {label!r} has no image files in {split}"))
        elif n_good == 0 and split == "train":
            findings.append(finding(rel, "empty_class", f"none of the {n_files} image files of class {label!r} "
                                                        "can be used"))
    totals = Counter(e.label for e in good)
    for label in sorted(counts.get("train", {})):
        if 0 < totals[label] < MIN_IMAGES_PER_CLASS:
            rel = class_dirs.get(("train", label), label)
            findings.append(finding(rel, "few_images", f"class {label!r} has {totals[label]} usable images"))
    train = counts.get("train", {})
    ratio = imbalance_ratio(list(train.values()))
    if ratio > IMBALANCE_RATIO:
        present = {k: v for k, v in train.items() if v}
        big, small = max(present, key=present.get), min(present, key=present.get)
        findings.append(finding(".", "class_imbalance", f"imbalance ratio {ratio:.1f}: {big!r} has {present[big]} "
                                                        f"training images, {small!r} has {present[small]}"))
    return findings


def _split_order(entry: Entry) -> tuple[int, str]:
    return ({"train": 0, "val": 1, "test": 2}.get(entry.split, 3), entry.rel)


