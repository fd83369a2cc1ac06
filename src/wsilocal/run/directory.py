"""A run directory: the names of its files, the kind of run it holds, and reading what the trainers saved.

Both trainers (``wsilocal train``: :mod:`wsilocal.train.trainer`; ``wsilocal baseline``:
:mod:`wsilocal.train.baseline`) write the same layout::

    RUN/config.yaml          the resolved configuration (TrainConfig; BaselineConfig for a baseline)
    RUN/model.json           class names (index = position) and what rebuilding the model needs: normalisation
                             mean/std, arch, module boundaries, trunk weights (the method); ``"method": "baseline"``,
                             model name, in_dim and how the tile features were made (a baseline); ``mask_glass``:
                             whether the classifiers leave the glass out of their attention (absent: they do not)
    RUN/checkpoint_last.pt   everything needed to resume (model, optimizer, scheduler, counters, history)
    RUN/checkpoint_best.pt   the model of the best validation epoch (``best_by``)
    RUN/metrics.csv|json     one row per epoch
    RUN/curves.png           learning curves
    RUN/train.log            the log
    RUN/summary.json         best epoch, validation metrics, skipped slides, warnings

and ``wsilocal evaluate`` adds ``metrics_<split>.json``, ``predictions_<split>.csv``, ``roc_<split>.png`` (a
baseline also ``attention_<split>/``, from which ``--heatmap`` draws ``heatmaps_<split>/``).

The kind of a run is the ``method`` its config.yaml records — ``local`` or ``streaming`` (a run of the method) or
``baseline`` (a tile-based MIL baseline) — and ``local`` where it records none (TrainConfig's default, as in runs
written before the field existed) or cannot be read (loading the config then says what is wrong with it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from wsilocal.atomic import write_text_atomic
from wsilocal.config import BASELINE_METHOD, VALUE_BEFORE_FIELD, BaselineConfig, TrainConfig, load_config
from wsilocal.errors import WsilocalError

CHECKPOINTS = ("best", "last")  # checkpoint_best.pt: the model of the best validation epoch; _last: to resume
DEFAULT_KIND = "local"  # the kind of a run whose config.yaml records no method (TrainConfig's default)


def model_signature(config: TrainConfig, classes: Sequence[str]) -> dict:
    """What must match for a checkpoint to load into a network of the method built from ``config``."""
    return {
        "arch": config.arch,
        "method": config.method,
        "k": config.k if config.boundaries is None else None,
        "boundaries": config.boundaries,
        "balanced": config.balanced,
        "conv1_stride": config.conv1_stride,
        "rfr": config.rfr,
        "classes": list(classes),
    }


def baseline_signature(model: str, classes: Sequence[str], in_dim: int) -> dict:
    """What must match for a checkpoint to load into a baseline model."""
    return {"method": BASELINE_METHOD, "model": model, "classes": list(classes), "in_dim": int(in_dim)}


def expected_signature(config: TrainConfig | BaselineConfig, meta: dict) -> dict:
    """The signature a checkpoint of the run with this ``config`` and ``model.json`` (``meta``) must carry."""
    if isinstance(config, BaselineConfig):
        return baseline_signature(config.model, meta["classes"], meta["in_dim"])
    return model_signature(config, meta["classes"])


def masks_glass(meta: dict) -> bool:
    """Whether the run of this ``model.json`` leaves the glass out of its classifiers' attention
    (``TrainConfig.mask_glass``); a run written before the record existed attends to every position."""
    return bool(meta.get("mask_glass", VALUE_BEFORE_FIELD["mask_glass"]))


@dataclass(frozen=True)
class EvaluationFiles:
    """The files of one evaluated split: in the run itself, or — a split of another cohort, an external test set —
    in a folder of the user's (``wsilocal evaluate RUN --cohort CSV --out DIR``)."""

    folder: Path
    split: str

    @property
    def metrics(self) -> Path:
        return self.folder / f"metrics_{self.split}.json"

    @property
    def predictions(self) -> Path:
        """One row per slide: ``slide_id, label, predicted, p_<class>...``."""
        return self.folder / f"predictions_{self.split}.csv"

    @property
    def roc(self) -> Path:
        return self.folder / f"roc_{self.split}.png"

    @property
    def attention(self) -> Path:
        """A baseline's per-slide tile attention, one ``<slide_id>.csv`` each."""
        return self.folder / f"attention_{self.split}"


class RunDirectory:
    """The files of one run directory (which need not exist yet: a trainer creates it) and what they hold."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # --- file names ------------------------------------------------------------------------------
    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metadata_file(self) -> Path:
        return self.path / "model.json"

    @property
    def log_file(self) -> Path:
        return self.path / "train.log"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def metrics_json(self) -> Path:
        return self.path / "metrics.json"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def curves_file(self) -> Path:
        return self.path / "curves.png"

    def checkpoint_file(self, which: str) -> Path:
        """``checkpoint_best.pt`` or ``checkpoint_last.pt`` (``which``: one of :data:`CHECKPOINTS`), as it is named."""
        return self.path / f"checkpoint_{which}.pt"

    def checkpoint_path(self, which: str = "best") -> Path:
        """The checkpoint to load for ``which``: ``best`` falls back to ``last`` while a run has no best yet (a
        baseline interrupted before its last stage, a run stopped before its last module)."""
        path = self.checkpoint_file(which)
        if which == "best" and not path.exists():
            return self.checkpoint_file("last")
        return path

    def evaluation_files(self, split: str) -> EvaluationFiles:
        """What ``wsilocal evaluate`` writes for a split of the run's own cohort: into the run."""
        return EvaluationFiles(self.path, split)

    def heatmaps_folder(self, split: str) -> Path:
        return self.path / f"heatmaps_{split}"

    # --- what the files hold ---------------------------------------------------------------------
    @property
    def holds_run(self) -> bool:
        """Whether a run was started here (its first epoch ended: ``checkpoint_last.pt`` exists)."""
        return self.checkpoint_file("last").exists()

    @property
    def kind(self) -> str:
        """``local``, ``streaming`` or ``baseline``: the ``method`` config.yaml records (see the module's docstring)."""
        try:
            values = yaml.safe_load(self.config_file.read_text())
        except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError):
            return DEFAULT_KIND
        method = values.get("method") if isinstance(values, dict) else None
        return method if isinstance(method, str) else DEFAULT_KIND

    @property
    def is_baseline(self) -> bool:
        """Whether this is a tile-based MIL baseline run (``wsilocal baseline``)."""
        return self.kind == BASELINE_METHOD

    def config(self) -> TrainConfig | BaselineConfig:
        """The run's configuration, read as the class its kind has (errors name config.yaml)."""
        return load_config(self.config_file, cls=BaselineConfig if self.is_baseline else TrainConfig)

    def metadata(self) -> dict:
        """``model.json``; a one-line :class:`~wsilocal.errors.WsilocalError` when it is missing or unreadable."""
        try:
            meta = json.loads(self.metadata_file.read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise self.unreadable_metadata(exc) from None
        return meta

    def unreadable_metadata(self, cause: Exception) -> WsilocalError:
        """The error for a ``model.json`` that cannot be used (unreadable, or lacking the key ``cause`` names)."""
        return WsilocalError(f"{self.metadata_file}: unreadable run metadata ({cause})")

    def write_metadata(self, meta: dict) -> None:
        """Write ``model.json`` (atomically)."""
        write_text_atomic(self.metadata_file, json.dumps(meta, indent=1))
