"""What the dataset doctor can find: the catalogue of kinds (`KINDS`), one `Finding`, and the `DoctorReport`
a scan returns.

Severities: "blocking" files cannot be trained on (unreadable, dangerous, contradictory labels) or the
folder cannot be loaded as laid out; "warning" will train but likely hurts or misleads; "info" is converted
on the fly and worth knowing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .balance import IMBALANCE_RATIO, imbalance_ratio
from .filecheck import MAX_ASPECT_RATIO, MIN_SIDE
from .images import MAX_PIXELS

Severity = Literal["info", "warning", "blocking"]
SEVERITIES: tuple[Severity, ...] = ("blocking", "warning", "info")

MIN_IMAGES_PER_CLASS = 5
"""Classes with fewer usable images than this are reported (`few_images`): too few to learn or to measure."""


@dataclass(frozen=True)
class FindingKind:
    """One kind of problem: its name, severity, group and the usual fix."""

    name: str
    severity: Severity
    group: str
    fix: str


KINDS: dict[str, FindingKind] = {
    k.name: k
    for k in (
        # unreadable: training would skip them
        FindingKind("empty_file", "blocking", "unreadable", "the file has 0 bytes: copy or download it again"),
        FindingKind("truncated", "blocking", "unreadable", "the data ends early: copy or download it again"),
        FindingKind("corrupt", "blocking", "unreadable", "re-export the image from its source, or remove it"),
        FindingKind("not_an_image", "blocking", "unreadable",
                    "the content is not an image despite its extension: remove it or fix its name"),
        FindingKind("unsupported_format", "blocking", "unreadable", "convert it to JPEG or PNG"),
        FindingKind("permission_denied", "blocking", "unreadable", "make it readable (chmod a+r FILE)"),
        FindingKind("unreadable", "blocking", "unreadable", "check that the file exists and can be read"),
        # convertible: load_rgb handles them
        FindingKind("grayscale", "info", "convertible", "none needed: the channel is repeated to RGB"),
        FindingKind("palette", "info", "convertible", "none needed: converted to RGB (transparency on white)"),
        FindingKind("rgba", "info", "convertible",
                    "none needed: composited on white; flatten it yourself for another background"),
        FindingKind("cmyk", "info", "convertible", "none needed: converted to RGB"),
        FindingKind("16_bit", "info", "convertible", "none needed: scaled to 8 bit"),
        FindingKind("exif_rotated", "info", "convertible", "none needed: the EXIF orientation is applied"),
        FindingKind("animated", "info", "convertible", "only the first frame is used; extract frames to use more"),
        FindingKind("too_small", "warning", "convertible",
                    f"under {MIN_SIDE} px on a side it is mostly upscaling blur: use a larger copy or remove it"),
        FindingKind("extreme_aspect", "warning", "convertible",
                    f"above {MAX_ASPECT_RATIO:g}:1 the centre crop keeps little of it: crop it yourself or remove it"),
        # dangerous: refused
        FindingKind("decompression_bomb", "blocking", "dangerous",
                    f"refused without decoding: downscale it below {MAX_PIXELS:,} pixels"),
        FindingKind("symlink_outside_root", "blocking", "dangerous",
                    "refused: copy the file into the dataset instead of linking outside it"),
        FindingKind("non_utf8_path", "blocking", "dangerous",
                    "rename it to a valid UTF-8 name (the run folder's split.json must record it)"),
        # structural
        FindingKind("layout", "blocking", "structural", "fix the folder layout as the message says"),
        FindingKind("empty_class", "blocking", "structural", "add images to the class folder or remove it"),
        FindingKind("few_images", "warning", "structural",
                    f"add images: under {MIN_IMAGES_PER_CLASS} per class can be neither learnt nor measured"),
        FindingKind("hidden_file", "info", "structural", "ignored by fit; delete it if it should not be there"),
        FindingKind("os_debris", "info", "structural", "ignored by fit; safe to delete"),
        FindingKind("nested_folder", "warning", "structural",
                    "its images are labelled with the class above it: move them up, or into their own class"),
        FindingKind("wrong_depth", "warning", "structural", "ignored by fit: move it into a class folder"),
        FindingKind("ignored_file", "info", "structural", "ignored by fit (not an image extension it reads)"),
        # labels
        FindingKind("conflicting_labels", "blocking", "labels",
                    "the same bytes are in several classes: keep the copy in the right class, delete the others"),
        FindingKind("leakage", "warning", "labels",
                    "the same picture is in train and in val/test, which inflates the scores: keep one copy"),
        FindingKind("duplicate", "info", "labels", "delete all but one copy (it weighs double in training)"),
        # balance
        FindingKind("class_imbalance", "warning", "balance",
                    f"fit balances classes above a ratio of {IMBALANCE_RATIO:g} (class weights, balanced sampling); "
                    "collect more images for the small classes if you can"),
    )
}
"""Every kind of finding, by name. The README's "Dataset doctor" section lists them."""


@dataclass(frozen=True)
class Finding:
    """One problem: `path` is POSIX and relative to the dataset root ("." for the whole dataset)."""

    path: str
    kind: str
    severity: Severity
    message: str
    fix: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def finding(path: str, kind: str, message: str) -> Finding:
    spec = KINDS[kind]
    return Finding(path, kind, spec.severity, message, spec.fix)


@dataclass
class DoctorReport:
    """The result of a scan. `ok` (exit status 0) when nothing blocks training."""

    root: Path
    findings: list[Finding]
    class_counts: dict[str, dict[str, int]]  # split -> class -> usable images
    files: int  # image files checked
    seconds: float = 0.0
    cache_hits: int = 0
    quarantined: list[dict[str, str]] = field(default_factory=list)  # moves made by `quarantine`

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "blocking"]

    @property
    def unresolved(self) -> list[Finding]:
        """Blocking findings still in place (not moved into quarantine)."""
        moved = {move["from"] for move in self.quarantined}
        return [f for f in self.blocking if f.path not in moved]

    @property
    def ok(self) -> bool:
        return not self.unresolved

    @property
    def imbalance_ratio(self) -> float:
        return imbalance_ratio(list(self.class_counts.get("train", {}).values()))

    def counts(self) -> dict[str, int]:
        """Findings per severity."""
        found = Counter(f.severity for f in self.findings)
        return {severity: found.get(severity, 0) for severity in SEVERITIES}

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "ok": self.ok,
            "files": self.files,
            "counts": self.counts(),
            "classes": self.class_counts,
            "imbalance_ratio": self.imbalance_ratio,
            "seconds": round(self.seconds, 3),
            "cache_hits": self.cache_hits,
            "findings": [f.to_dict() for f in self.findings],
            "quarantined": self.quarantined,
        }


def sorted_findings(findings: list[Finding]) -> list[Finding]:
    """Blocking first, then warnings, then info; by kind and path within each."""
    rank = {severity: i for i, severity in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: (rank[f.severity], f.kind, f.path))

