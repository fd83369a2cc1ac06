"""Bags of tile features for the MIL baselines: one bag per slide, read from ``<features_dir>/<slide_id>.h5``.

A bag is the (N, D) feature matrix of a slide's N tiles, their level-0 (x, y) coordinates, the slide's label
index and id. :func:`load_bags` checks every file of a split once up front, reading it with the project's
HDF5 reader, so a slide without a features file, a file that fails to read, or one whose feature dimension
differs from the others is *skipped with its reason* before training starts rather than failing mid-epoch.
Afterwards features are read again one bag at a time (``FeatureBags.get``) and never kept, so memory stays
that of the largest bag whatever the size of the cohort.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wsilocal.errors import WsilocalError
from wsilocal.features.h5 import read_features
from wsilocal.slide.cohort import Cohort


@dataclass
class Bag:
    """One slide's features (N, D) float32, tile coordinates (N, 2) level-0 x, y, label index and id."""

    features: torch.Tensor
    coords: np.ndarray
    label: int
    slide_id: str


def features_path(features_dir: str | Path, slide_id: str) -> Path:
    """Where the features of a slide live (CLAM's layout: one HDF5 file per slide)."""
    return Path(features_dir) / f"{slide_id}.h5"


class FeatureBags:
    """The usable bags of one split. ``skipped`` maps slide id → reason for every slide left out."""

    def __init__(self, paths: list[Path], labels: list[int], slide_ids: list[str], in_dim: int,
                 skipped: dict[str, str]):
        self.paths = paths
        self.labels = labels
        self.slide_ids = slide_ids
        self.in_dim = in_dim
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, index: int) -> Bag:
        """Read bag ``index`` from its file (nothing is cached)."""
        features, coords, _ = read_features(self.paths[index])
        return Bag(torch.from_numpy(np.ascontiguousarray(features, np.float32)), np.asarray(coords),
                   self.labels[index], self.slide_ids[index])


def _check_bag(path: Path, in_dim: int | None) -> tuple[int, str | None]:
    """(feature dimension, problem or None) of one features file."""
    if not path.is_file():
        return 0, f"no features file {path} (run `wsilocal features` for this slide)"
    try:
        features, coords, _ = read_features(path)
    except WsilocalError as exc:
        return 0, str(exc)
    if features.ndim != 2 or len(features) == 0:
        return 0, f"{path}: no tile features (shape {tuple(features.shape)})"
    if len(coords) != len(features):
        return 0, f"{path}: {len(features)} feature rows but {len(coords)} coordinates"
    dim = int(features.shape[1])
    if in_dim is not None and dim != in_dim:
        return dim, f"{path}: features are {dim}-dimensional, expected {in_dim} like the other slides"
    return dim, None


def load_bags(cohort: Cohort, split: str, features_dir: str | Path, in_dim: int | None = None) -> FeatureBags:
    """The bags of one cohort split; ``in_dim`` (None: taken from the first readable file) is enforced."""
    paths, labels, ids, skipped = [], [], [], {}
    for slide in cohort.split(split):
        path = features_path(features_dir, slide.slide_id)
        dim, problem = _check_bag(path, in_dim)
        if problem:
            skipped[slide.slide_id] = problem
            continue
        in_dim = dim
        paths.append(path)
        labels.append(cohort.label_index(slide))
        ids.append(slide.slide_id)
    return FeatureBags(paths, labels, ids, in_dim or 0, skipped)
