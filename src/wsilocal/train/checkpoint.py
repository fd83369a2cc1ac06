"""Checkpoints: written atomically, read with ``weights_only=True``, checked against the model they load into.

A checkpoint is a plain dictionary of tensors and JSON-like values (no pickled objects), so it loads with
``torch.load(..., weights_only=True)``; a file containing anything else is refused. It carries a
``signature`` describing the architecture (method, split, classes, stride); loading it into a model with a
different signature is a clear :class:`~wsilocal.errors.CheckpointError`, not a shape traceback.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from wsilocal.atomic import atomic_output, remove_stale_temporaries
from wsilocal.errors import CheckpointError

FORMAT_VERSION = 1
#: Signature entries added after checkpoints were first written, and what a checkpoint without them was made with.
SIGNATURE_DEFAULTS = {"arch": "resnet34"}


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` via a temporary file, fsync and an atomic rename (never half-written).

    A failed write (disk full, read-only folder) leaves the previous file at ``path`` as it was and no
    temporary file; temporary files of killed earlier runs in the folder are removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent)
    try:
        with atomic_output(path, fsync=True) as tmp, open(tmp, "wb") as handle:
            torch.save({**state, "format_version": FORMAT_VERSION}, handle)  # a handle: write errors are OSErrors
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write the checkpoint ({exc.strerror or exc}); "
                              "the previous one, if any, is unchanged") from exc


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
        # torch's message is long and suggests how to allow the object; keep only what names it.
        lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line]
        detail = _first_sentence(lines[0]) if lines else "unsupported object"
        raise CheckpointError(f"{path}: refused to load, it contains objects beyond tensors and plain data "
                              f"({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_sentence(first)})") from None
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict) or "format_version" not in state:
        raise CheckpointError(f"{path}: not a wsilocal checkpoint")
    # A module's extra state (``get_extra_state``, e.g. MIL-RNN's stage) is plain data; the rest are tensors.
    if not all(isinstance(k, str) and (isinstance(v, torch.Tensor) or k.endswith("_extra_state"))
               for k, v in model.items()):
        raise CheckpointError(f"{path}: not a wsilocal checkpoint (its model is not a state dict of tensors)")
    if expected_signature is not None:
        found = state.get("signature") if isinstance(state.get("signature"), dict) else {}
        found = {**SIGNATURE_DEFAULTS, **found}
        diffs = [f"{k}: checkpoint {found.get(k)!r} vs model {v!r}" for k, v in expected_signature.items()
                 if found.get(k) != v]
        if diffs:
            raise CheckpointError(f"{path}: checkpoint is from another model ({'; '.join(diffs)})")
    return state


def load_model_state(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """``model.load_state_dict(state["model"])``, a CheckpointError naming ``path`` instead of torch's traceback.

    The signature check of :func:`load_checkpoint` catches another architecture; this catches a checkpoint
    whose signature matches but whose tensors do not (edited by hand, or written by another version).
    """
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = "; ".join(lines[1:3]) if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise CheckpointError(f"{path}: the checkpoint's tensors do not fit the model ({detail[:300]})") from None


def _first_sentence(text: str, limit: int = 200) -> str:
    """The first sentence of a library's message (they go on with advice that does not apply here)."""
    return text.split(". ")[0].strip()[:limit]
