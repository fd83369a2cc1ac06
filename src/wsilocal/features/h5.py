"""Feature files: one HDF5 file per slide in CLAM's layout.

``<slide_id>.h5`` holds two datasets, ``features`` (N, D) float32 — one row per tile, D = 512 for our
ResNet34 — and ``coords`` (N, 2) int64, the level-0 (x, y) of each tile's top-left corner, row i of one
belonging to row i of the other. File attributes describe how the features were made (see
:mod:`wsilocal.features.extract`); files made by CLAM have other attributes or none and read just as well.

Files are written under a temporary name in the same folder and renamed, so a file at the final path is
always complete.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import h5py
import numpy as np

from wsilocal.atomic import atomic_output
from wsilocal.errors import WsilocalError


def write_features(path: str | Path, features: np.ndarray, coords: np.ndarray, attrs: Mapping[str, object]) -> None:
    """Write ``features`` (N, D) and ``coords`` (N, 2) with file attributes ``attrs`` to ``path``, atomically.

    Features are stored as float32, coords as int64. Attribute values must be numbers, strings or arrays;
    None values are left out (HDF5 has no null). An interrupted or failed write leaves nothing at ``path``
    (an older file there stays as it was) and no temporary file.

    Raises:
        ValueError: the arrays do not have the shapes above, or N is 0.
    """
    path = Path(path)
    features = np.asarray(features, dtype=np.float32)
    coords = np.asarray(coords)
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features must be (N, D) with N, D >= 1, got shape {features.shape}")
    if coords.shape != (features.shape[0], 2) or not np.issubdtype(coords.dtype, np.integer):
        raise ValueError(f"coords must be integer ({features.shape[0]}, 2), got {coords.dtype} {coords.shape}")
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as file:
        file.create_dataset("features", data=features)
        file.create_dataset("coords", data=coords.astype(np.int64))
        for key, value in attrs.items():
            if value is not None:
                file.attrs[key] = value


def read_features(path: str | Path, *, dim: int | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, object]]:
    """Read a feature file written by :func:`write_features` or by CLAM.

    Accepts what CLAM writes too: float16 or float64 features, int32 coords, and a leading batch axis of 1
    (``(1, N, D)`` and ``(1, N, 2)``).

    Args:
        path: the ``.h5`` file.
        dim: the feature dimension the caller needs (e.g. 512), checked when given.

    Returns:
        ``(features, coords, attrs)``: float32 (N, D), int64 (N, 2) level-0 (x, y), and the file attributes
        as plain Python values (an empty dict for a file without any).

    Raises:
        WsilocalError: naming the file, when it is missing, not HDF5, lacks a dataset, or the shapes,
            types or values do not fit (N = 0, non-finite features, fractional coords).
    """
    path = Path(path)
    with _open(path) as file:
        features = _dataset(path, file, "features")
        coords = _dataset(path, file, "coords")
        attrs = _plain_attrs(file.attrs)
    if not np.issubdtype(features.dtype, np.floating):
        raise WsilocalError(f"{path}: 'features' must be floating point, got {features.dtype}")
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise WsilocalError(f"{path}: 'features' must have shape (N, D) or (1, N, D) with N >= 1, "
                            f"got {_shape(features)}")
    if dim is not None and features.shape[1] != dim:
        raise WsilocalError(f"{path}: features have {features.shape[1]} dimensions, expected {dim}")
    if coords.shape != (features.shape[0], 2):
        raise WsilocalError(f"{path}: 'coords' must have shape ({features.shape[0]}, 2) to match "
                            f"'features' {_shape(features)}, got {_shape(coords)}")
    if not np.isfinite(features).all():
        raise WsilocalError(f"{path}: 'features' contains NaN or infinite values")
    if not np.issubdtype(coords.dtype, np.integer):
        if not (np.issubdtype(coords.dtype, np.floating) and np.isfinite(coords).all()
                and (coords == np.round(coords)).all()):
            raise WsilocalError(f"{path}: 'coords' must hold whole pixel positions, got {coords.dtype} values")
    return features.astype(np.float32), coords.astype(np.int64), attrs


def read_attrs(path: str | Path) -> dict[str, object]:
    """The file attributes of a feature file, without reading its datasets (WsilocalError if unreadable)."""
    path = Path(path)
    with _open(path) as file:
        return _plain_attrs(file.attrs)


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise WsilocalError(f"{path}: feature file not found" if not path.exists() else f"{path}: not a file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:  # h5py's error for a file that is not HDF5, truncated, or unreadable
        raise WsilocalError(f"{path}: not a readable HDF5 file ({exc})") from exc


def _dataset(path: Path, file: h5py.File, name: str) -> np.ndarray:
    """Dataset ``name`` as an array, its leading batch axis of 1 dropped (CLAM's ``(1, N, D)``)."""
    item = file.get(name)
    if not isinstance(item, h5py.Dataset):
        found = ", ".join(sorted(file.keys())) or "nothing"
        raise WsilocalError(f"{path}: no '{name}' dataset (found: {found}); expected CLAM's layout "
                            f"with datasets 'features' (N, D) and 'coords' (N, 2)")
    data = item[()]
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "iuf":
        raise WsilocalError(f"{path}: '{name}' must be a numeric array, got {getattr(data, 'dtype', type(data))}")
    return data[0] if data.ndim == 3 and data.shape[0] == 1 else data


def _plain_attrs(attrs: h5py.AttributeManager) -> dict[str, object]:
    """HDF5 attributes as Python values: numpy scalars → int/float, bytes → str, arrays stay arrays."""
    plain: dict[str, object] = {}
    for key, value in attrs.items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        elif isinstance(value, np.generic):
            value = value.item()
        plain[key] = value
    return plain


def _shape(array: np.ndarray) -> str:
    return "(" + ", ".join(str(n) for n in array.shape) + ")"
