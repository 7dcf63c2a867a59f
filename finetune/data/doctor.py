"""The dataset doctor: find, explain and quarantine the files that would spoil a training run.

`diagnose(root)` scans any layout `fit` accepts and returns a `DoctorReport`: one `Finding` per problem, each
with the file or class folder it is about, a kind from `KINDS`, a severity and the fix. `quarantine(report)`
moves the blocking files into ``root/_quarantine/<kind>/`` with a manifest (nothing is deleted).
`preflight(splits)` is the same scan on the exact file lists `fit` is about to train on: it leaves out the
files that cannot be used, names them, and stops the run when too many cannot.

This module is the doctor's front door; the work lives in rooms of its own:

    findings.py     the catalogue of kinds, `Finding`, `DoctorReport`
    diagnosis.py    the scan: `diagnose`, `diagnose_splits`
    layoutcheck.py  the walk through the folders and the structural findings
    filecheck.py    per-file checks (decoding, conversions, hashes), cached and in parallel
    labelcheck.py   across files: conflicting labels, leakage, duplicates, class counts
    quarantine.py   moving the blocking files out of the way
    preflight.py    the scan `fit` runs before training
"""

from .diagnosis import diagnose, diagnose_splits
from .findings import KINDS, MIN_IMAGES_PER_CLASS, DoctorReport, Finding, FindingKind
from .labelcheck import NEAR_DUPLICATE_BITS
from .paths import display_path
from .preflight import MAX_UNUSABLE_FRACTION, PreflightReport, preflight
from .quarantine import quarantine

__all__ = [
    "KINDS",
    "MAX_UNUSABLE_FRACTION",
    "MIN_IMAGES_PER_CLASS",
    "NEAR_DUPLICATE_BITS",
    "DoctorReport",
    "Finding",
    "FindingKind",
    "PreflightReport",
    "diagnose",
    "diagnose_splits",
    "display_path",
    "preflight",
    "quarantine",
]
