"""Atomic file writes: a reader sees the old file or the new one, never half of one.

The content goes to a temporary file in the target's folder (`.<name>.<pid>.<random>.tmp`), is
flushed and fsynced, then renamed over the target. A process killed mid-write leaves its temporary
file behind; the next write of the same target removes those of processes no longer running.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files earlier writes of `path` left behind (their process is gone); returns them."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if len(parts) == 3 and parts[0].isdigit() and int(parts[0]) != os.getpid() and not _pid_alive(int(parts[0])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """`with atomic_file(path) as f: ...` writes `path` atomically; on any error `path` is left as it was."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    for stale in remove_stale_temporaries(path):
        print(f"removed {stale}, left by an interrupted write", flush=True)
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # os.open with mode 0o666 lets the umask decide the permissions, as a plain open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(folder)


def write_json(obj: Any, path: str | os.PathLike, **dump_kwargs: Any) -> None:
    """`json.dump(obj)` to `path`, atomically."""
    with atomic_file(path, "w") as f:
        json.dump(obj, f, **dump_kwargs)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; best effort, as some file systems/platforms cannot fsync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
