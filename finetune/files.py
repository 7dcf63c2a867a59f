"""Files written whole or not at all, file digests and the toolkit's cache folder: the one copy of each,
used by every room."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import platformdirs

_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it over ``path``: readers never see
    half a file, and a crash leaves the old file (or none) in place. The file gets the permissions ``open``
    would give it (``mkstemp`` makes owner-only files; a shared cache must stay readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=_json_default) + "\n").encode())


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # tensors and numpy arrays
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks: the checksum that others can verify."""
    return hash_file(path, hashlib.sha256(), chunk)


class Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


def hash_file(path: Path, digest: Digest, chunk: int = 1 << 20) -> str:
    """Feed a file's bytes to ``digest`` (any ``hashlib`` object) in chunks; its hex digest. Raises OSError."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """The toolkit's cache folder (converted weights, the doctor's checks, decoded images): `$FINETUNE_CACHE`,
    else the per-user cache folder of `finetune`."""
    override = os.environ.get("FINETUNE_CACHE")
    return Path(override).expanduser() if override else Path(platformdirs.user_cache_dir("finetune"))
