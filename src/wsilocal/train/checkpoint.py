"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the model they load into.

A checkpoint is a plain dictionary of tensors and JSON-like values (no pickled objects), so it loads with
``torch.load(..., weights_only=True)``; a file containing anything else is refused. It carries a
``signature`` describing the architecture (method, split, classes, stride); loading it into a model with a
different signature is a clear :class:`~wsilocal.errors.CheckpointError`, not a shape traceback.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from wsilocal.errors import CheckpointError

FORMAT_VERSION = 1


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` via a temporary file and an atomic rename (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save({**state, "format_version": FORMAT_VERSION}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, expected_signature: dict | None = None) -> dict:
    """Read a checkpoint safely; compare its signature with ``expected_signature`` when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty checkpoint file (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long; keep the line that names the offending object.
        lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line]
        detail = lines[0] if lines else "unsupported object"
        raise CheckpointError(f"{path}: refused to load, it contains objects beyond tensors and plain data "
                              f"({detail[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first[:160]})") from None
    if not isinstance(state, dict) or "format_version" not in state or "model" not in state:
        raise CheckpointError(f"{path}: not a wsilocal checkpoint")
    if expected_signature is not None:
        found = state.get("signature", {})
        diffs = [f"{k}: checkpoint {found.get(k)!r} vs model {v!r}" for k, v in expected_signature.items()
                 if found.get(k) != v]
        if diffs:
            raise CheckpointError(f"{path}: checkpoint is from another model ({'; '.join(diffs)})")
    return state
