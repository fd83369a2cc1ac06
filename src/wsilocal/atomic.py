"""Output files that are never half-written, and the clean-up after a process killed while writing one.

Every file wsilocal writes for later reuse (cache entries, feature files, checkpoints, configs) is written under
a temporary name in the same folder, ``.<name>.tmp-<host>-<pid>``, and renamed over the final name only when
complete (``os.replace`` is atomic within a file system). A failed write — disk full, read-only folder, an
exception — removes the temporary file. A process killed with SIGKILL cannot do that: the next run in the
folder removes temporary files whose process (on this host) no longer exists, so nothing accumulates.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wsilocal.errors import WsilocalError

_HOST = socket.gethostname().replace("-", "_")  # '-' separates host and pid in the name


def temporary_path(path: str | Path) -> Path:
    """The temporary name this process writes ``path`` under (same folder, hidden)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


@contextmanager
def atomic_output(path: str | Path, *, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on any error it is removed.

    With ``fsync`` the data is flushed to disk before the rename, so a power cut cannot leave an empty file
    at ``path`` either (checkpoints).
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files in ``folder`` left by processes of this host that no longer run.

    Returns the files removed. Temporary files of running processes, and of other hosts (a shared file
    system), are left alone.
    """
    removed = []
    try:
        candidates = list(Path(folder).glob(".*.tmp-*"))
    except OSError:
        return removed
    for tmp in candidates:
        host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
        if host != _HOST or not pid.isdigit() or _running(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:  # removed meanwhile, or a read-only folder: nothing to do
            pass
    return removed


def check_writable_folder(folder: str | Path, what: str) -> Path:
    """Create ``folder`` if needed and check a file can be created in it; WsilocalError naming it if not.

    Run before long work, so a read-only or full output folder is reported at once and not after hours.
    """
    folder = Path(folder)
    probe = temporary_path(folder / ".write-test")  # this process's own name: no race with another run
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise WsilocalError(f"{folder}: cannot write the {what} here ({exc.strerror or exc})") from None
    return folder


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
