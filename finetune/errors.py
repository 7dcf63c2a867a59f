"""The toolkit's own exceptions: every error a user can cause is one of these, with a message that names
the bad file or value and the fix."""

from __future__ import annotations

import shlex
import signal
from pathlib import Path


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line warnings."""
    text = str(exc)
    return text.splitlines()[0] if text else ""


class FinetuneError(Exception):
    """Base class of every error the toolkit raises on purpose."""


class DatasetError(FinetuneError, ValueError):
    """The image folder cannot be used as given (missing, empty, one class, ...)."""


class ImageDecodeError(FinetuneError):
    """One image file cannot be decoded; training skips it and names it."""

    def __init__(self, path: str | Path, reason: str, kind: str = "corrupt") -> None:
        self.path = Path(path)
        self.reason = reason
        self.kind = kind  # a `finetune.data.doctor.KINDS` name: empty_file, truncated, corrupt, not_an_image, ...
        super().__init__(f"cannot decode image {path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str, str]]:
        # Exception pickling replays __init__ with self.args (the message alone); DataLoader workers and
        # multiprocessing need the real arguments back.
        return (type(self), (self.path, self.reason, self.kind))


class RecipeError(FinetuneError, ValueError):
    """A recipe, recipe file or override is invalid."""


class UsageError(FinetuneError, ValueError):
    """Arguments that contradict each other or name something that cannot be used."""


class Interrupted(Exception):
    """``fit`` stopped on SIGINT or SIGTERM after saving a resumable checkpoint (``phases/resume.py``)."""

    def __init__(self, signum: int, run_dir: Path, step: int) -> None:
        self.signum, self.run_dir = signum, run_dir
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}, checkpoint saved; resume with: "
                         f"finetune fit --resume {shlex.quote(str(run_dir))}")
