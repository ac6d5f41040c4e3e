"""Atomic file output and small JSON/YAML helpers: a crash never leaves a half-written file."""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

__all__ = ["atomic_path", "write_json", "read_json", "write_yaml", "read_yaml", "append_jsonl", "read_jsonl", "to_jsonable"]


_UMASK = os.umask(0o022)
os.umask(_UMASK)
_HOST = "".join(c if c.isalnum() else "-" for c in socket.gethostname()) or "host"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    If the body raises, the temporary file is removed and ``path`` keeps its previous content. A
    process killed mid-write (SIGKILL) cannot clean up: its temporary file, named
    ``.NAME.<host>.<pid>.<random>.tmp``, is removed by the next successful write of the same target
    on the same host once that pid is gone (writers on other hosts of a shared folder are left alone).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the result the usual mode
        os.replace(tmp, target)
        _remove_stale_temporaries(target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temporaries(target: Path) -> None:
    prefix = f".{target.name}.{_HOST}."
    for candidate in target.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid_text = candidate.name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        try:
            os.kill(int(pid_text), 0)
        except ProcessLookupError:  # the writer is gone: its half-written file is garbage
            candidate.unlink(missing_ok=True)
        except PermissionError:  # alive, owned by someone else
            continue


def to_jsonable(value: Any) -> Any:
    """Convert numpy/torch scalars and arrays, paths and non-finite floats (→ None) for strict JSON."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy / torch
        return to_jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented, strict JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_yaml(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as YAML (keys in their given order), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_jsonable(data), sort_keys=False))


def read_yaml(path: str | os.PathLike) -> Any:
    return yaml.safe_load(Path(path).read_text())


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON object as a line (flushed and fsynced, so a crash loses at most this line)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a") as handle:
        handle.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; a truncated last line (crash mid-write) is ignored."""
    records = []
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) - 1:
                break
            raise
    return records
