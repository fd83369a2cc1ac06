"""``wsilocal bench accuracy``: the paper's Table 1 (every method) and Table 4 (RFR ablation) on synthetic cohorts.

For each *task* a synthetic cohort is generated once (or reused) with the parameters of a
:class:`CohortSettings`, its slides are cached at the task's resolution and its tile features extracted once.
Then every *row* (a method: a tile-feature MIL baseline, StreamingCNN, or our locally supervised network with
some K, with or without RFR, greedy or simultaneous) is trained with several seeds and evaluated on the
cohort's test split. Seeds change the model's initial weights and the data order; the splits stay the same.

Every run is an ordinary run directory, ``OUT/runs/<task>/<row>/seed<s>``, that ``wsilocal evaluate`` and
``wsilocal predict`` open as usual. When a run finishes, ``bench_run.json`` is written into it (its settings
and test metrics) and its ``checkpoint_last.pt`` (optimizer state) is dropped unless asked to keep it; a later
benchmark into the same ``OUT`` reuses the run instead of training again, and resumes an interrupted run from
its last checkpoint. Cohorts and runs made with other settings are refused, not mixed in.

``OUT/accuracy.json`` holds one record per task/row/seed (its test metrics and per-slide test predictions,
``test_predictions``), the mean ± sample standard deviation (n − 1) over seeds, the 95 % bootstrap interval over
test slides of each row's seed mean, and the paired differences behind the report's claims
(:data:`ACCURACY_CLAIMS`, :func:`paired_comparisons`; the statistics are :mod:`wsilocal.bench.stats`'s);
``accuracy.md`` the tables beside the paper's numbers and the paired differences; ``accuracy.png`` bars with the
intervals as error bars. Runs finished before per-slide predictions were recorded read them back from their own
``predictions_test.csv`` where it gives the run's saved metrics; rows without them keep the seed spread alone.

Caveat for both sides: no pretrained weights can be downloaded here, so by default our trunk starts from random
weights (trained with the demo's learning rates, :class:`wsilocal.demo.DemoSettings`) and the MIL baselines run
on features of a randomly initialised ResNet34. The paper fine-tunes ImageNet weights and its baselines use
ImageNet features: ``--weights FILE`` (a state dict of ``--arch``, ResNet34 by default) gives every method those
weights; ``--arch resnet18`` runs every method on the lighter trunk.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from wsilocal.atomic import write_text_atomic
from wsilocal.bench import log_progress
from wsilocal.bench.stats import RESAMPLES, bootstrap_row, paired_difference, reading
from wsilocal.config import VALUE_BEFORE_FIELD, TrainConfig
from wsilocal.demo import QUICK as DEMO_QUICK
from wsilocal.demo import DemoSettings, demo_config
from wsilocal.errors import ConfigError, WsilocalError
from wsilocal.plotting import pyplot
from wsilocal.synth import DEFAULT_SIZE, GENERATOR_VERSION, SynthParams, class_names

RUN_MARKER = "bench_run.json"  # written last into a run directory: the run is finished, with these results
PREDICTIONS_FILE = "predictions_test.csv"  # what `wsilocal evaluate` writes into a run: per-slide probabilities
METRICS = ("accuracy", "balanced_accuracy", "auroc")
METRIC_LABELS = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "auroc": "AUROC"}
PATH_FIELDS = ("cohort", "out", "cache", "features")  # config fields left out when comparing a run's settings

# --- the paper's numbers (Zhang et al., MICCAI 2022; real slides at 5x, ImageNet weights, GPUs) -------------

PAPER_DATASETS = ("TCGA-NSCLC", "TCGA-RCC", "LKS")
# Table 1: (accuracy, AUROC) per dataset; MIL-RNN only on the binary TCGA-NSCLC.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "maxpool": {"TCGA-NSCLC": (0.8318, 0.9036), "TCGA-RCC": (0.8495, 0.9306), "LKS": (0.8049, 0.9366)},
    "meanpool": {"TCGA-NSCLC": (0.7944, 0.8669), "TCGA-RCC": (0.8172, 0.9309), "LKS": (0.6000, 0.9086)},
    "abmil": {"TCGA-NSCLC": (0.8037, 0.8816), "TCGA-RCC": (0.8495, 0.9423), "LKS": (0.8341, 0.9392)},
    "gabmil": {"TCGA-NSCLC": (0.8364, 0.8762), "TCGA-RCC": (0.8602, 0.9535), "LKS": (0.8146, 0.9399)},
    "milrnn": {"TCGA-NSCLC": (0.8178, 0.9011)},
    "dsmil": {"TCGA-NSCLC": (0.8271, 0.8909), "TCGA-RCC": (0.8710, 0.9590), "LKS": (0.8390, 0.9328)},
    "clam_sb": {"TCGA-NSCLC": (0.8224, 0.9185), "TCGA-RCC": (0.8763, 0.9701), "LKS": (0.8293, 0.9446)},
    "clam_mb": {"TCGA-NSCLC": (0.8598, 0.9131), "TCGA-RCC": (0.8763, 0.9716), "LKS": (0.8439, 0.9448)},
    "streaming": {"TCGA-NSCLC": (0.8692, 0.9260), "TCGA-RCC": (0.8817, 0.9660), "LKS": (0.8927, 0.9652)},
    "ours_k4": {"TCGA-NSCLC": (0.8785, 0.9377), "TCGA-RCC": (0.9140, 0.9740), "LKS": (0.8976, 0.9562)},
    "ours_k8": {"TCGA-NSCLC": (0.8785, 0.9322), "TCGA-RCC": (0.9032, 0.9760), "LKS": (0.8829, 0.9633)},
}
# Table 4: accuracy without RFR (with RFR is Table 1's).
PAPER_TABLE4: dict[str, dict[str, float]] = {
    "ours_k4_norfr": {"TCGA-NSCLC": 0.8738, "TCGA-RCC": 0.8925, "LKS": 0.8829},
    "ours_k8_norfr": {"TCGA-NSCLC": 0.8458, "TCGA-RCC": 0.8710, "LKS": 0.8780},
}
# The paper's dataset each task is set beside: same number of classes (NSCLC: 2 subtypes, RCC: 3).
PAPER_DATASET_OF_TASK = {"context": "TCGA-NSCLC", "morphology": "TCGA-RCC"}


def paper_numbers(row: str, dataset: str) -> tuple[float | None, float | None]:
    """The paper's (accuracy, AUROC) of a row on a dataset; None where the paper has no number."""
    if row in PAPER_TABLE4:
        return PAPER_TABLE4[row].get(dataset), None
    return PAPER_TABLE1.get(row, {}).get(dataset, (None, None))


# --- rows: the methods compared ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One method of the table. ``kind``: ``mil`` (tile features + a MIL model), ``local`` (our trainer; K=1
    is end-to-end) or ``streaming`` (StreamingCNN, trained by our trainer as ``method="streaming"``)."""

    name: str
    label: str
    kind: str
    model: str = ""  # MIL model (kind "mil")
    k: int = 1
    rfr: bool = False
    schedule: str = "simultaneous"
    head_context: int = 0  # channels of H's context block (beyond the paper); 0: the paper's H


def _mil(name: str, label: str) -> Row:
    return Row(name, label, "mil", model=name)


def _ours(k: int, rfr: bool = True, schedule: str = "simultaneous") -> Row:
    name = f"ours_k{k}" + ("" if rfr else "_norfr") + ("_greedy" if schedule == "greedy" else "")
    if k == 1:
        return Row(name, "end-to-end (K=1)", "local", k=1, rfr=False)
    label = f"ours K={k}" + ("" if rfr else " without RFR") + (", greedy" if schedule == "greedy" else "")
    return Row(name, label, "local", k=k, rfr=rfr, schedule=schedule)


ROWS: dict[str, Row] = {row.name: row for row in (
    _mil("maxpool", "max-pooling"), _mil("meanpool", "mean-pooling"), _mil("abmil", "ABMIL"),
    _mil("gabmil", "GABMIL"), _mil("milrnn", "MIL-RNN"), _mil("dsmil", "DSMIL"), _mil("clam_sb", "CLAM-SB"),
    _mil("clam_mb", "CLAM-MB"), _mil("transmil", "TransMIL"),
    Row("streaming", "StreamingCNN", "streaming"),
    _ours(4), _ours(8), _ours(4, rfr=False), _ours(8, rfr=False), _ours(1), _ours(4, schedule="greedy"),
    _ours(2),  # not in the paper and not run by default: the cheapest local row, for smoke tests
    # Beyond the paper, not run by default: H reads relations between neighbouring positions (the context task;
    # its width chosen on that task's validation split, docs/benchmarks.md).
    Row("ours_k4_context", "ours K=4 + context block", "local", k=4, rfr=True, head_context=16),
)}
# ours_k4 is also the "simultaneous" side of the schedule comparison (the trainer's default schedule).
DEFAULT_ROWS = tuple(name for name in ROWS if name not in ("ours_k2", "ours_k4_context"))


def row_status(row: Row, n_classes: int) -> str | None:
    """Why a row is not run on a task with ``n_classes`` classes (None: it is run)."""
    from wsilocal.models.mil import MIL_MODELS  # torch: this module loads without it (for the command's options)

    if row.kind == "mil" and MIL_MODELS[row.model].binary_only and n_classes != 2:
        return "n/a: binary only"
    return None


# --- settings ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortSettings:
    """A task's synthetic cohort and the resolution every method reads it at.

    Attributes:
        task: ``morphology`` (class = arrangement of tumour nuclei) or ``context`` (binary, near/far: the gap
            between a tumour focus and a lymphoid follicle; see ``docs/synthetic.md``).
        classes: number of classes of the morphology task (the context task has two).
        slides_per_class: slides generated per class (about a quarter of the cases hold two slides).
        size: level-0 (width, height) at 0.25 µm/px; None: the generator's default for the task × layout_scale.
        mpp: µm/px at which our network reads whole slides *and* the MIL baselines read their tiles.
        tile: MIL tile edge in px at ``mpp``.
        layout_scale: context task: every length of the generator's layout (and the default size) × this. The
            generator's least near-gap has a fixed 16 µm term, so the smallest scale that validates is 1/4.
        seed: the cohort's seed (slides, splits).
        splits: train, validation and test shares of the cases, per class.
    """

    task: str
    slides_per_class: int
    mpp: float
    tile: int
    classes: int = 3
    size: tuple[int, int] | None = None
    layout_scale: float = 1.0
    seed: int = 0
    splits: tuple[float, float, float] = (0.5, 0.2, 0.3)

    @property
    def n_classes(self) -> int:
        return len(class_names(self.classes, self.task))

    def synth_params(self) -> SynthParams:
        """The generator's parameters for this cohort (checked: a context tile must not see both structures)."""
        params = SynthParams(task=self.task, classes=self.classes, seed=self.seed)
        if self.task == "context":
            s = self.layout_scale
            params = replace(params, context_tile_um=params.context_tile_um * s,
                             context_tumour_um=_scaled(params.context_tumour_um, s),
                             context_follicle_um=_scaled(params.context_follicle_um, s),
                             context_near_um=_scaled(params.context_near_um, s),
                             context_far_um=_scaled(params.context_far_um, s))
            if self.tile * self.mpp > params.context_tile_um:
                raise ConfigError(f"bench accuracy: context tiles of {self.tile} px at {self.mpp:g} µm/px are larger "
                                  f"than the layout's {params.context_tile_um:g} µm: one tile could hold both "
                                  "structures")
        elif self.layout_scale != 1.0:
            raise ConfigError("bench accuracy: layout_scale applies to the context task only")
        size = self.size or tuple(round(v * self.layout_scale) for v in DEFAULT_SIZE[self.task])
        params = replace(params, size=size)
        params.validate()
        return params


def _scaled(pair: tuple[float, float], scale: float) -> tuple[float, float]:
    return (pair[0] * scale, pair[1] * scale)


@dataclass(frozen=True)
class AccuracyBenchSettings:
    """Everything that sizes the benchmark; :data:`FULL` (≤ 2 h on 2 CPU cores) and :data:`QUICK` (≤ 15 min).

    Attributes:
        cohorts: one per task.
        seeds: seeds per row (0, 1, …).
        epochs: epochs of our network (per module under the greedy schedule, as the trainer defines them).
        mil_epochs: epochs of the MIL baselines; None: each model's published count (up to CLAM's 200).
        demo: learning rates, accumulation and RFR patches of our network: the demo's, so that both agree.
        workers: processes writing synthetic slides and preparing the cache.
        keep_last_checkpoint: keep ``checkpoint_last.pt`` of finished runs. It holds the optimizer state, only
            needed to continue training (~260 MB per run of ours, ~9 GB for the full benchmark); ``evaluate`` and
            ``predict`` load ``checkpoint_best.pt``, which is always kept.
        weights: a state dict of ``arch`` (ImageNet ResNet34 weights: the paper's setting) for our trunk,
            StreamingCNN's and the MIL baselines' tile features; None: random weights for all (the default, as
            nothing can be downloaded here). With weights our trunk fine-tunes at the paper's rate
            (``TrainConfig.lr_trunk``) instead of the demo's from-scratch one.
        init: without ``weights``, where every method starts: ``pretrained`` — ``wsilocal pretrain`` on each
            task's own train and val slides (never its test split), the same weights for our trunk, StreamingCNN
            and the MIL features — or ``random`` (random weights for all). FULL and QUICK pretrain. ``proxy``:
            then (from ``weights`` when given) the *supervised* proxy pretraining of :mod:`wsilocal.pretrain.proxy`
            on the tissue-type masks of a proxy cohort (the task's generator, seed + :data:`PROXY_SEED_OFFSET`,
            ``proxy_slides_per_class``; none of the benchmark's slides, their labels never read).
        pretrain: :class:`~wsilocal.config.PretrainConfig` fields of that pretraining (steps, batch size, ...).
        proxy: :class:`~wsilocal.pretrain.proxy.ProxyConfig` fields of the proxy pretraining.
        proxy_slides_per_class: slides per class of the proxy cohort.
        arch: every method's trunk (ours, StreamingCNN's, the MIL baselines' feature extractor and the
            pretraining): ``resnet34`` (the paper's), or ``resnet18`` (about half the CPU time) / ``resnet50``.
    """

    cohorts: tuple[CohortSettings, ...]
    seeds: int = 3
    epochs: int = 6
    mil_epochs: int | None = 50
    demo: DemoSettings = field(default_factory=DemoSettings)
    workers: int = 2
    keep_last_checkpoint: bool = False
    weights: str | None = None
    init: str = "random"
    pretrain: dict[str, Any] = field(default_factory=dict)
    arch: str = "resnet34"
    proxy: dict[str, Any] = field(default_factory=dict)
    proxy_slides_per_class: int = 30

    def with_budget(self, *, epochs: int | None = None, mil_epochs: int | None = None,
                    slides_per_class: int | None = None) -> AccuracyBenchSettings:
        """These settings with more (or less) training and data: ``epochs`` of ours, ``mil_epochs`` of the MIL
        baselines, ``slides_per_class`` of every cohort; None keeps a value.

        Raises ConfigError for a value below 1 (below 3 slides per class: one per split).
        """
        for name, value, least in (("epochs", epochs, 1), ("mil-epochs", mil_epochs, 1),
                                   ("slides-per-class", slides_per_class, 3)):
            if value is not None and value < least:
                raise ConfigError(f"bench accuracy: --{name} must be at least {least}, got {value}")
        cohorts = self.cohorts if slides_per_class is None else tuple(
            replace(c, slides_per_class=slides_per_class) for c in self.cohorts)
        return replace(self, cohorts=cohorts, epochs=self.epochs if epochs is None else epochs,
                       mil_epochs=self.mil_epochs if mil_epochs is None else mil_epochs)

    def cohort(self, task: str) -> CohortSettings:
        for settings in self.cohorts:
            if settings.task == task:
                return settings
        raise ConfigError(f"bench accuracy: no task {task!r} in these settings; tasks: "
                          + ", ".join(c.task for c in self.cohorts))


# FULL: morphology slides as the demo's (4096² px at 0.25 µm/px ≈ 512² px at 5x) with 128-px tiles (~8-16 per
# slide; the paper's 256-px tiles would leave 2-4), 70 per class: 69 test slides, where random scores reach balanced
# accuracy 0.43 and AUROC 0.59 one time in 20. The context task's layout halved and read at 4 µm/px: the same
# ~900 × 400 px per slide, 64-px tiles of the (halved) layout's 256 µm, as the full layout read at 8 µm/px, but a
# quarter of the level-0 pixels to write, so 100 per class (~60 test slides) stay affordable. One seed by default
# (--seeds 3 for the full table); each task pretrains once. docs/benchmarks.md has the times.
INITS = ("pretrained", "random", "proxy")
# The proxy cohort's generator seed is the task's + this: none of the benchmark's slides (seed), nor of a
# confirmation cohort's (seed + CONFIRM_SEED_OFFSET).
PROXY_SEED_OFFSET = 2000
# The pretraining of FULL (VICReg; docs/pretraining.md has its time and tile-class probes): 96-px tiles,
# views of 64 px, batch 64.
PRETRAIN_FULL: dict[str, Any] = {"steps": 600, "batch_size": 64, "tile": 96, "crop": 64}
FULL = AccuracyBenchSettings(cohorts=(
    CohortSettings("morphology", slides_per_class=70, mpp=2.0, tile=128, size=(4096, 4096)),
    CohortSettings("context", slides_per_class=100, mpp=4.0, tile=64, layout_scale=0.5),
), seeds=1, init="pretrained", pretrain=PRETRAIN_FULL)
# QUICK: the demo's quick sizes; the context layout shrunk 4× and read at 4 µm/px (~450 × 200 px): every row runs
# end to end in minutes, to check the pipeline, not to decide anything.
QUICK = AccuracyBenchSettings(cohorts=(
    CohortSettings("morphology", slides_per_class=4, mpp=2.0, tile=128, size=(2048, 2048)),
    CohortSettings("context", slides_per_class=4, mpp=4.0, tile=32, layout_scale=0.25),
), seeds=2, epochs=1, mil_epochs=5, demo=DEMO_QUICK, init="pretrained",
    pretrain={"steps": 10, "batch_size": 8, "warmup_steps": 2, "bn_tiles": 32, "tile": 64, "crop": 48},
    proxy={"steps": 10, "batch_size": 4, "crop": 96, "eval_every": 5}, proxy_slides_per_class=3)


# --- cohorts: generate, cache, extract features (each once) ------------------------------------------------


@dataclass
class PreparedCohort:
    """Where a task's cohort, cache and tile features lie, and what preparing them took."""

    settings: CohortSettings
    csv: Path
    cache: Path
    features: Path
    n_slides: dict[str, int]  # per split
    feature_skipped: dict[str, str]
    seconds: dict[str, float]
    weights: str | None = None  # every method's initial weights (None: random)
    arch: str = "resnet34"  # every method's trunk


def weights_digest(weights: str | Path) -> str:
    """The first 12 hex digits of a weights file's SHA-256: names the folders of what was made with it."""
    try:
        return hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:12]
    except OSError as exc:
        raise ConfigError(f"{weights}: cannot read the weights file ({exc.strerror or exc})") from None


def _made_with(weights: str | None, arch: str) -> str:
    """The suffix naming what a folder's contents were made with: ``-<arch>`` for a trunk other than ResNet34 (none
    for it: the folders made before other trunks existed keep their names), ``-<digest>`` of a weights file."""
    return ("" if arch == "resnet34" else f"-{arch}") + ("" if weights is None else f"-{weights_digest(weights)}")


def features_folder(folder: Path, weights: str | None, arch: str = "resnet34") -> Path:
    """Where a cohort's tile features lie: ``features`` (random ResNet34), ``features-<digest>`` per weights file,
    ``features-<arch>[-<digest>]`` for another trunk, so that features of other weights are never reused."""
    return folder / f"features{_made_with(weights, arch)}"


def runs_folder(out: Path, weights: str | None, arch: str = "resnet34") -> Path:
    """Where the runs lie: ``OUT/runs`` from random weights, ``OUT/runs-<digest>`` from a weights file, with
    ``-<arch>`` before the digest for a trunk other than ResNet34."""
    return out / f"runs{_made_with(weights, arch)}"


def pretraining_config(cohort_settings: CohortSettings, cohort_csv: Path, out: Path, overrides: dict[str, Any]):
    """The PretrainConfig of a task's pretraining on its cohort's train and val slides, at the task's MPP, in its
    own folder ``OUT/pretrain/<task>-<objective>-<digest of the settings>``: pretrainings with other settings sit
    side by side, and each finished one is reused."""
    from wsilocal.config import PretrainConfig, config_from_dict

    config = config_from_dict({"cohort": str(cohort_csv), "mpp": cohort_settings.mpp, **overrides, "out": "-"},
                              PretrainConfig)
    # arch at its default is left out of the digest: folders made before the field existed keep their names
    settings_json = json.dumps({k: v for k, v in asdict(config).items() if k not in ("out", "cohort")
                                and not (k == "arch" and v == PretrainConfig.arch)}, sort_keys=True)
    digest = hashlib.sha256(settings_json.encode()).hexdigest()[:8]
    folder = out / "pretrain" / f"{cohort_settings.task}-{config.objective}-{digest}"
    return replace(config, out=str(folder)).validate()


def task_weights(settings: AccuracyBenchSettings, cohort_settings: CohortSettings, cohort_csv: Path, out: Path,
                 progress: bool = True) -> str | None:
    """The initial weights of every method on a task: the user's file, this task's pretraining or None (random);
    with ``init="proxy"`` the proxy pretraining that starts from those."""
    if settings.init == "proxy":
        start = settings.weights or _pretraining_weights(settings, cohort_settings, cohort_csv, out, progress)
        return proxy_weights(settings, cohort_settings, start, out, progress)
    if settings.weights is not None:
        return settings.weights
    if settings.init == "random":
        return None
    return _pretraining_weights(settings, cohort_settings, cohort_csv, out, progress)


def _pretraining_weights(settings: AccuracyBenchSettings, cohort_settings: CohortSettings, cohort_csv: Path,
                         out: Path, progress: bool) -> str:
    """The weights of the task's self-supervised pretraining on its own train and val slides (run or reused)."""
    from wsilocal.pretrain.trainer import CHECKPOINT_FILE, pretrain

    config = pretraining_config(cohort_settings, cohort_csv, out, {**settings.pretrain, "arch": settings.arch})
    # An interrupted pretraining continues from its checkpoint (bit-identical to an uninterrupted one).
    resume = (Path(config.out) / CHECKPOINT_FILE).is_file()
    log_progress(progress, f"[{cohort_settings.task}] pretraining on the train and val slides → {config.out}"
                 + (" (resuming)" if resume else ""))
    return str(pretrain(config, resume=resume, progress=progress).weights)


def proxy_cohort_settings(cohort_settings: CohortSettings, slides_per_class: int) -> CohortSettings:
    """The task's generator settings with the proxy cohort's seed and size."""
    return replace(cohort_settings, seed=cohort_settings.seed + PROXY_SEED_OFFSET, slides_per_class=slides_per_class)


def proxy_config(settings: AccuracyBenchSettings):
    """The proxy pretraining's :class:`~wsilocal.pretrain.proxy.ProxyConfig`: ``settings.proxy`` with the benchmark's
    arch, type-checked and validated (ConfigError naming an unknown or bad setting)."""
    from wsilocal.config import config_from_dict
    from wsilocal.pretrain.proxy import ProxyConfig

    unknown = sorted(set(settings.proxy) - {f.name for f in fields(ProxyConfig)})
    if unknown:
        raise ConfigError(f"bench accuracy: unknown proxy setting(s) {', '.join(unknown)}")
    return config_from_dict({**settings.proxy, "arch": settings.arch}, ProxyConfig).validate()


def proxy_weights(settings: AccuracyBenchSettings, cohort_settings: CohortSettings, start: str | None, out: Path,
                  progress: bool = True) -> str:
    """The weights of the supervised proxy pretraining of a task (:mod:`wsilocal.pretrain.proxy`) from ``start``:
    its proxy cohort made and cached in ``OUT/cohorts/<task>-proxy-<n>``, the training in
    ``OUT/proxy/<task>-<digest of settings and start>``; each reused when there."""
    from wsilocal.models.resnet import file_sha256
    from wsilocal.prepare.cache import PrepareSettings, prepare_cohort
    from wsilocal.pretrain.proxy import proxy_pretrain
    from wsilocal.slide.cohort import load_cohort

    config = proxy_config(settings)
    proxy_settings = proxy_cohort_settings(cohort_settings, settings.proxy_slides_per_class)
    folder = out / "cohorts" / f"{cohort_settings.task}-proxy-{settings.proxy_slides_per_class}"
    csv_path = prepare_synthetic_cohort(proxy_settings, folder, workers=settings.workers, progress=progress)
    prepare_cohort(load_cohort(csv_path), folder / "cache", PrepareSettings(mpp=cohort_settings.mpp),
                   workers=settings.workers, progress=progress)
    digest = hashlib.sha256(json.dumps({"config": asdict(config), "start": file_sha256(start) if start else None,
                                        "cohort": asdict(proxy_settings)}, sort_keys=True).encode()).hexdigest()[:8]
    run = out / "proxy" / f"{cohort_settings.task}-{digest}"
    log_progress(progress, f"[{cohort_settings.task}] supervised proxy pretraining on the tissue types of "
                           f"{folder} → {run}")
    return str(proxy_pretrain(folder, start, run, config, progress=progress))


def prepare_synthetic_cohort(cohort_settings: CohortSettings, folder: Path, *, workers: int = 2,
                             progress: bool = True) -> Path:
    """Generate the cohort in ``folder`` unless it is there already (checked: same generator and parameters);
    returns its ``cohort.csv``."""
    from wsilocal.synth import synthesize_cohort

    params = cohort_settings.synth_params()
    meta_file = folder / "synth.json"  # written last by the generator: its presence means a complete cohort
    if meta_file.is_file():
        _check_cohort(meta_file, params, cohort_settings)
    else:
        log_progress(progress, f"[{cohort_settings.task}] generating {cohort_settings.slides_per_class} slides per "
                               f"class, {params.size[0]}×{params.size[1]} px → {folder}")
        synthesize_cohort(folder, slides_per_class=cohort_settings.slides_per_class, seed=cohort_settings.seed,
                          workers=workers, splits=cohort_settings.splits, progress=progress, params=params)
    return folder / "cohort.csv"


def prepare_benchmark_cohort(cohort_settings: CohortSettings, folder: Path, *, workers: int = 2,
                             weights: str | None = None, progress: bool = True,
                             initial_weights: Callable[[Path], str | None] | None = None,
                             arch: str = "resnet34") -> PreparedCohort:
    """Generate (or reuse) the cohort in ``folder``, cache its slides and extract tile features (an ``arch`` trunk
    with ``weights``, else randomly initialised), all reusable. ``initial_weights(cohort_csv)``, when given, picks the
    weights once the cohort exists (a pretraining on it) and replaces ``weights``.

    Raises ConfigError when ``folder`` holds a cohort generated with other parameters.
    """
    # Imported here, as the trainers below: the CLI imports this module to build its parser.
    from wsilocal.features.extract import extract_features
    from wsilocal.prepare.cache import PrepareSettings, prepare_cohort
    from wsilocal.slide.cohort import SPLITS, load_cohort

    seconds = {}
    start = time.perf_counter()
    csv_path = prepare_synthetic_cohort(cohort_settings, folder, workers=workers, progress=progress)
    seconds["synth"] = time.perf_counter() - start
    if initial_weights is not None:
        start = time.perf_counter()
        weights = initial_weights(csv_path)
        seconds["pretrain"] = time.perf_counter() - start
    cohort = load_cohort(csv_path)

    start = time.perf_counter()
    cache = folder / "cache"
    result, _ = prepare_cohort(cohort, cache, PrepareSettings(mpp=cohort_settings.mpp), workers=workers,
                               progress=progress)
    if result.skipped:
        raise WsilocalError(f"{csv_path}: {len(result.skipped)} slide(s) could not be cached, e.g. "
                            + "; ".join(f"{k}: {v}" for k, v in list(result.skipped.items())[:2]))
    seconds["prepare"] = time.perf_counter() - start

    start = time.perf_counter()
    features = features_folder(folder, weights, arch)
    extracted = extract_features(cohort, features, mpp=cohort_settings.mpp, tile=cohort_settings.tile,
                                 weights=weights, progress=progress, arch=arch)
    seconds["features"] = time.perf_counter() - start
    return PreparedCohort(cohort_settings, csv_path, cache, features,
                          {split: len(cohort.split(split)) for split in SPLITS}, dict(extracted.skipped), seconds,
                          weights, arch)


def shortcut_aurocs(folder: Path, classes: Sequence[str]) -> dict[str, float | None]:
    """How well each of :func:`~wsilocal.synth.slide_measurements` alone ranks the test slides of the
    cohort in ``folder``: the AUROC of the positive class (macro one-vs-rest for more than two classes), each
    class's direction (larger or smaller) taken from the training split, as a one-number classifier would learn it.

    About 0.5 when the classes differ only in their tissue's pattern, though on a test split of a few slides a
    number unrelated to the class often reaches 0.75 (4 + 4 slides: one draw in six). A model whose AUROC is no
    better than such a number's may have learnt that number instead of the task (the report checks this).
    """
    from wsilocal.synth import slide_measurements
    from wsilocal.train.metrics import binary_auroc

    slides = json.loads((folder / "synth.json").read_text())["slides"]
    measured = slide_measurements(folder)

    def split_values(split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
        ids = [slide_id for slide_id, info in slides.items() if info["split"] == split]
        return (np.array([measured[i][name] for i in ids]),
                np.array([classes.index(slides[i]["label"]) for i in ids]))

    scored = [1] if len(classes) == 2 else range(len(classes))  # binary: the positive class, as our AUROC
    result = {}
    for name in next(iter(measured.values())):
        (train, train_labels), (test, test_labels) = split_values("train", name), split_values("test", name)
        aurocs = []
        for c in scored:
            on_train = binary_auroc(train, train_labels == c)
            larger = on_train is None or on_train >= 0.5
            auroc = binary_auroc(test if larger else -test, test_labels == c)
            if auroc is not None:
                aurocs.append(auroc)
        result[name] = float(np.mean(aurocs)) if aurocs else None
    return result


def random_score_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Balanced accuracy and AUROC of many (N, C) probability arrays at once, shape (D, N, C) → (D,): what
    :func:`~wsilocal.train.metrics.classification_metrics` gives for each, vectorised for :func:`chance_levels`.
    Assumes no tied scores within a class's column (true of continuous random draws)."""
    labels = np.asarray(labels, int)
    n_classes = probabilities.shape[2]
    present = [c for c in range(n_classes) if (labels == c).any()]
    predicted = probabilities.argmax(axis=2)
    balanced = np.mean([(predicted[:, labels == c] == c).mean(axis=1) for c in present], axis=0)
    ranks = probabilities.argsort(axis=1).argsort(axis=1) + 1  # each slide's 1-based rank in its class's column
    aurocs = []
    for c in [1] if n_classes == 2 else range(n_classes):  # binary: the positive class, as our AUROC
        positive = labels == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if n_pos and n_neg:
            aurocs.append((ranks[:, positive, c].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return {"balanced_accuracy": balanced, "auroc": np.mean(aurocs, axis=0)}


def chance_levels(labels: Sequence[int], n_classes: int, *, draws: int = 100_000,
                  seed: int = 0) -> dict[str, float]:
    """What a classifier that learnt nothing reaches on this test split one time in 20: the 95th percentile of
    balanced accuracy and AUROC over ``draws`` random probability vectors (uniform on the simplex) per slide.

    On a test split of a dozen slides chance spreads wide (4 + 4 slides: AUROC 0.875 or more one time in 17), and
    seeds do not average it out, since every seed is scored on the same slides. A row must beat these levels
    before the report reads anything into its rank. With 10⁵ draws the percentile is the exact one wherever the
    exact distribution's CDF passes 0.95 at least 0.003 away from a step.
    """
    labels = np.asarray(labels, int)
    rng = np.random.default_rng(seed)
    chunks: dict[str, list[np.ndarray]] = {"balanced_accuracy": [], "auroc": []}
    for start in range(0, draws, 10_000):  # chunks bound memory on large test splits
        shape = (min(10_000, draws - start), len(labels))
        for name, values in random_score_metrics(rng.dirichlet(np.ones(n_classes), shape), labels).items():
            chunks[name].append(values)
    # the smallest level that random scores exceed at most one time in 20
    return {name: float(np.quantile(np.concatenate(values), 0.95, method="inverted_cdf"))
            for name, values in chunks.items()}


def _check_cohort(meta_file: Path, params: SynthParams, settings: CohortSettings) -> None:
    """Refuse to reuse a cohort made with other parameters (its results would not be this benchmark's)."""
    meta = json.loads(meta_file.read_text())
    wanted = {"version": GENERATOR_VERSION, "params": json.loads(json.dumps(asdict(params))),
              "slides_per_class": settings.slides_per_class, "splits": list(settings.splits)}
    differs = sorted(key for key, value in wanted.items() if meta.get(key) != value)
    if differs:
        raise ConfigError(f"{meta_file.parent}: holds a {settings.task} cohort generated with other "
                          f"{', '.join(differs)}; use another --out or delete that folder")


# --- runs ----------------------------------------------------------------------------------------------------


def run_config(row: Row, cohort: PreparedCohort, seed: int, run_dir: Path, settings: AccuracyBenchSettings):
    """The configuration of one run: a BaselineConfig for MIL rows, else a TrainConfig built on the demo's."""
    if row.kind == "mil":
        from wsilocal.config import BaselineConfig

        return BaselineConfig(cohort=str(cohort.csv), features=str(cohort.features), out=str(run_dir),
                              model=row.model, epochs=settings.mil_epochs, seed=seed)
    base: TrainConfig = demo_config(run_dir, settings.demo)  # the demo's optimiser settings: bench and demo agree
    if cohort.weights is not None:  # fine-tuning pretrained weights: the paper's trunk rate
        base = replace(base, weights=cohort.weights, lr_trunk=TrainConfig.lr_trunk)
    return replace(base, cohort=str(cohort.csv), out=str(run_dir), cache=str(cohort.cache), arch=cohort.arch,
                   mpp=cohort.settings.mpp, method="streaming" if row.kind == "streaming" else "local",
                   k=row.k, rfr=row.rfr, schedule=row.schedule, head_context=row.head_context,
                   epochs=settings.epochs, seed=seed, workers=1)


def _settings_of(config) -> dict[str, Any]:
    """A run's settings as compared on reuse: the config without its paths (OUT may have moved)."""
    return {k: v for k, v in json.loads(json.dumps(asdict(config))).items() if k not in PATH_FIELDS}


def finished_run(run_dir: Path, config) -> dict[str, Any] | None:
    """The saved result of ``run_dir`` when a run with the same settings finished there (with ``reused``
    true); None when no run finished there. Raises ConfigError when it finished with other settings."""
    marker = run_dir / RUN_MARKER
    if not marker.is_file():
        return None
    saved, wanted = json.loads(marker.read_text()), _settings_of(config)
    # A field added to the config since the run finished: what that run did is the field's default, unless the
    # default changed behaviour (VALUE_BEFORE_FIELD: glass masking, off in every run before it existed).
    defaults = json.loads(json.dumps({f.name: VALUE_BEFORE_FIELD.get(f.name, f.default) for f in fields(config)
                                      if f.default is not MISSING}))
    saved["settings"] = {**{k: defaults[k] for k in wanted.keys() - saved["settings"].keys() if k in defaults},
                         **saved["settings"]}
    if saved["settings"] != wanted:
        differs = sorted(k for k in wanted.keys() | saved["settings"].keys()
                         if wanted.get(k) != saved["settings"].get(k))
        raise ConfigError(f"{run_dir}: finished with other settings ({', '.join(differs)}); use another --out "
                          "or delete that run")
    result = saved["result"]
    if "test_predictions" not in result:  # finished before bench_run.json held them: the run's own file, if it agrees
        predictions = read_test_predictions(run_dir)
        if predictions is not None and _predictions_agree(predictions, result):
            result = {**result, "test_predictions": predictions}
    return {**result, "reused": True}


def read_test_predictions(run_dir: Path) -> dict[str, Any] | None:
    """The per-slide test predictions ``wsilocal evaluate`` wrote into a run (:data:`PREDICTIONS_FILE`): classes,
    slide ids, label indices and probabilities (at the file's 6 decimals), as :mod:`wsilocal.bench.stats` takes
    them; None where the file is missing or not such a file."""
    try:
        with open(Path(run_dir) / PREDICTIONS_FILE, newline="") as handle:
            rows = list(csv.reader(handle))
        header = rows[0]
        if header[:3] != ["slide_id", "label", "predicted"] or not all(h.startswith("p_") for h in header[3:]):
            return None
        classes = [h[2:] for h in header[3:]]
        return {"classes": classes, "slide_ids": [r[0] for r in rows[1:]],
                "labels": [classes.index(r[1]) for r in rows[1:]],
                "probabilities": [[float(v) for v in r[3:]] for r in rows[1:]]}
    except (OSError, IndexError, ValueError):
        return None


def _predictions_agree(predictions: dict[str, Any], result: dict[str, Any]) -> bool:
    """Whether predictions read back from a run give the metrics its marker saved (not a later evaluation's file).

    The file holds 6 decimals: saturated probabilities (below 1e-6, or equal to 6 decimals) come back tied, which
    moves AUROC, so an AUROC that differs is taken where the file has tied scores.
    """
    from wsilocal.train.metrics import classification_metrics

    if not predictions["slide_ids"] or len(predictions["slide_ids"]) != result.get("n_test"):
        return False
    metrics = classification_metrics(np.array(predictions["probabilities"]), np.array(predictions["labels"]),
                                     predictions["classes"])
    for m in METRICS:
        if (metrics[m] is None) != (result.get(m) is None):
            return False
        if metrics[m] is not None and abs(metrics[m] - result[m]) > 1e-6 and not (m == "auroc"
                                                                                  and has_tied_scores(predictions)):
            return False
    return True


def has_tied_scores(predictions: dict[str, Any]) -> bool:
    """Whether two slides have the same probability of some class (as 6 decimals make of saturated outputs)."""
    probabilities = np.asarray(predictions["probabilities"])
    return any(len(np.unique(column)) < len(column) for column in probabilities.T)


def train_and_evaluate(row: Row, config, run_dir: Path, *, keep_last_checkpoint: bool = True,
                       progress: bool = False) -> dict[str, Any]:
    """Train one run (resuming an interrupted one), evaluate it on the test split, mark it finished (and drop
    its ``checkpoint_last.pt`` unless ``keep_last_checkpoint``).

    Returns the test metrics, the per-slide test predictions (``test_predictions``, see
    :func:`read_test_predictions`), the run's seconds and ``reused`` false.
    """
    from wsilocal.run.directory import RunDirectory
    from wsilocal.train.baseline import train_baseline
    from wsilocal.train.evaluate import evaluate_run
    from wsilocal.train.trainer import train

    start = time.perf_counter()
    last_checkpoint = RunDirectory(run_dir).checkpoint_file("last")
    resume = last_checkpoint.is_file()  # an interrupted run continues where it stopped
    (train_baseline if row.kind == "mil" else train)(config, resume=resume, progress=progress)
    metrics = evaluate_run(run_dir, "test", progress=progress)
    result = {**{m: metrics[m] for m in METRICS}, "n_test": metrics["n"],
              "seconds": round(time.perf_counter() - start, 1), "test_predictions": read_test_predictions(run_dir)}
    write_text_atomic(run_dir / RUN_MARKER, json.dumps({"settings": _settings_of(config), "result": result},
                                                       indent=1))
    if not keep_last_checkpoint:  # only now: until the marker exists, it is what resumes the run
        last_checkpoint.unlink(missing_ok=True)
    return {**result, "reused": False}


# --- statistics ----------------------------------------------------------------------------------------------


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1; None for one value) of each metric over a row's seeds, and the
    95 % bootstrap interval over test slides of each metric's seed mean (``bootstrap``, see
    :func:`wsilocal.bench.stats.bootstrap_row`).

    Runs that failed, and metrics a run could not compute (AUROC without both classes), are left out; ``n``
    counts the values used. ``bootstrap`` is None, with ``bootstrap_note`` saying why, where a finished run has
    no per-slide predictions (runs finished before the benchmark recorded them and whose own
    ``predictions_test.csv`` is gone or differs).
    """
    result: dict[str, Any] = {}
    for metric in METRICS:
        values = [r[metric] for r in records if not r.get("error") and r.get(metric) is not None]
        result[metric] = {"n": len(values), "mean": statistics.fmean(values) if values else None,
                          "std": statistics.stdev(values) if len(values) > 1 else None}
    done = [r for r in records if not r.get("error")]
    result["seconds_per_run"] = statistics.fmean(r["seconds"] for r in done) if done else None
    result["bootstrap"], note = _row_bootstrap(done)
    if note:
        result["bootstrap_note"] = note
    return result


NO_PREDICTIONS = "no per-slide test predictions (runs finished before the benchmark recorded them)"


def _row_bootstrap(done: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    if not done:
        return None, None
    predictions = [r.get("test_predictions") for r in done]
    if not all(predictions):
        return None, NO_PREDICTIONS
    try:
        return bootstrap_row(predictions), None
    except ValueError as exc:  # seeds scored on other slides or classes: not one test split
        return None, f"no interval: {exc}"


@dataclass(frozen=True)
class AccuracyClaim:
    """One of the paper's accuracy claims on a task: ``row`` scores higher than every one of ``others`` (those that
    ran) on ``metric`` (``accuracy``: decided on balanced accuracy; ``auroc``). ``kind`` (``mil``, ``streaming``,
    ``rfr``) picks the report's reason where we disagree."""

    text: str
    row: str
    others: tuple[str, ...]
    metric: str
    kind: str

    @property
    def decided_by(self) -> str:
        """The metric whose paired interval decides the claim (balanced accuracy for accuracy: the test splits are
        stratified, and calling every slide one class does not pass for accuracy)."""
        return "balanced_accuracy" if self.metric == "accuracy" else self.metric


MIL_ROWS = tuple(name for name, row in ROWS.items() if row.kind == "mil")
_BETTER = {"accuracy": "is more accurate than", "auroc": "ranks slides (AUROC) better than"}
# Table 1 (ours above every MIL baseline and StreamingCNN, K=4 and K=8) and Table 4 (RFR), per task.
ACCURACY_CLAIMS: tuple[AccuracyClaim, ...] = (
    *(AccuracyClaim(f"ours K={k} {_BETTER[m]} every tile-based MIL baseline", f"ours_k{k}", MIL_ROWS, m, "mil")
      for k in (4, 8) for m in ("accuracy", "auroc")),
    *(AccuracyClaim(f"ours K={k} {_BETTER[m]} StreamingCNN", f"ours_k{k}", ("streaming",), m, "streaming")
      for k in (4, 8) for m in ("accuracy", "auroc")),
    *(AccuracyClaim(f"RFR improves the accuracy of K={k}", f"ours_k{k}", (f"ours_k{k}_norfr",), "accuracy", "rfr")
      for k in (4, 8)),
)


def paired_comparisons(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The paired differences behind :data:`ACCURACY_CLAIMS`: for each task, claim and other row that ran, the
    difference claim row − other row in the claim's ``decided_by`` metric with its 95 % bootstrap interval over
    the test slides both scored, the same resamples for both (:func:`wsilocal.bench.stats.paired_difference`).

    Each entry: ``task``, ``claim`` (its text), ``row``, ``other``, ``metric``, ``difference`` (None, with
    ``note``, where a run has no per-slide predictions or the metric is undefined).
    """
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in report.get("records", []):
        if not r.get("error"):
            runs.setdefault((r["task"], r["row"]), []).append(r)
    result = []
    for task in report.get("tasks", {}):
        for claim in ACCURACY_CLAIMS:
            for other in claim.others:
                a, b = runs.get((task, claim.row)), runs.get((task, other))
                if not a or not b:
                    continue
                entry: dict[str, Any] = {"task": task, "claim": claim.text, "row": claim.row, "other": other,
                                         "metric": claim.decided_by, "difference": None}
                predictions_a = [r.get("test_predictions") for r in a]
                predictions_b = [r.get("test_predictions") for r in b]
                if not all(predictions_a) or not all(predictions_b):
                    entry["note"] = NO_PREDICTIONS
                else:
                    try:
                        entry["difference"] = paired_difference(predictions_a, predictions_b, claim.decided_by)
                    except ValueError as exc:
                        entry["note"] = f"no interval: {exc}"
                    if entry["difference"] is None and "note" not in entry:
                        entry["note"] = f"{METRIC_LABELS[claim.decided_by]} undefined on these test slides"
                result.append(entry)
    return result


def run_accuracy_benchmark(out: str | Path, settings: AccuracyBenchSettings = FULL, *,
                           tasks: Sequence[str] | None = None, rows: Sequence[str] | None = None,
                           seeds: int | None = None, confirm: int | None = None,
                           progress: bool = True) -> dict[str, Any]:
    """Run (or reuse) every task × row × seed; write ``accuracy.json``, ``.md`` and ``.png`` into ``out``.

    Args:
        settings: sizes of cohorts and training (:data:`FULL` or :data:`QUICK`, or your own).
        tasks: task names of ``settings.cohorts`` (default all).
        rows: names from :data:`ROWS` (default :data:`DEFAULT_ROWS`).
        seeds: number of seeds (default ``settings.seeds``).
        confirm: also score every finished run on a fresh test cohort of this many slides per class
            (:func:`run_confirmation`; the report's ``confirmation`` section).
        progress: print one line per run (and the generator's and extractor's progress bars).

    A run that fails is recorded with its error and the benchmark goes on. Returns the report's content.
    """
    out = Path(out)
    rows = list(rows or DEFAULT_ROWS)
    unknown = [name for name in rows if name not in ROWS]
    if unknown:
        raise ConfigError(f"bench accuracy: unknown row(s) {', '.join(unknown)}; known: {', '.join(ROWS)}")
    cohorts = [settings.cohort(task) for task in (tasks or [c.task for c in settings.cohorts])]
    n_seeds = settings.seeds if seeds is None else seeds
    if n_seeds < 1:
        raise ConfigError(f"bench accuracy: seeds must be >= 1, got {n_seeds}")
    for cohort_settings in cohorts:
        cohort_settings.synth_params()  # every setting is checked before hours of work start
        if confirm is not None:
            confirmation_settings(cohort_settings, confirm).synth_params()

    if settings.init not in INITS:
        raise ConfigError(f"bench accuracy: init must be one of {', '.join(INITS)}, got {settings.init!r}")
    if settings.init in ("pretrained", "proxy") and settings.weights is None:  # bad settings, before hours of work
        pretraining_config(cohorts[0], out / "cohort.csv", out, settings.pretrain)
    if settings.init == "proxy":
        proxy_config(settings)
    if settings.weights is not None:  # a wrong weights file too
        from wsilocal.models.resnet import ResNetTrunk, load_trunk_weights

        load_trunk_weights(ResNetTrunk(arch=settings.arch), settings.weights)
    started = time.perf_counter()
    report: dict[str, Any] = {"settings": asdict(settings), "seeds": list(range(n_seeds)), "rows": rows,
                              "tasks": {}, "records": [], "aggregates": []}
    for cohort_settings in cohorts:
        task = cohort_settings.task
        cohort = prepare_benchmark_cohort(
            cohort_settings, out / "cohorts" / task, workers=settings.workers, progress=progress,
            initial_weights=lambda csv, c=cohort_settings: task_weights(settings, c, csv, out, progress),
            arch=settings.arch)
        classes = class_names(cohort_settings.classes, task)
        labels = labels_of_test_split(cohort.csv, classes)
        report["tasks"][task] = {"classes": classes, "slides": cohort.n_slides,
                                 "feature_skipped": cohort.feature_skipped, "seconds": cohort.seconds,
                                 "synth_params": asdict(cohort_settings.synth_params()),
                                 "paper_dataset": PAPER_DATASET_OF_TASK[task], "weights": cohort.weights,
                                 "init": ("proxy" if settings.init == "proxy" else
                                          "file" if settings.weights else settings.init),
                                 "shortcuts": shortcut_aurocs(cohort.csv.parent, classes),
                                 "chance_95": chance_levels(labels, len(classes))}
        for name in rows:
            row = ROWS[name]
            status = row_status(row, cohort_settings.n_classes)
            records = [] if status else [_record(row, cohort, seed, out, settings, progress)
                                         for seed in range(n_seeds)]
            report["records"] += records
            status = status or failure_status(records)
            report["aggregates"].append({"task": task, "row": name, "label": row.label, "status": status or "done",
                                         **aggregate(records)})
    if confirm is not None:
        report["confirmation"] = run_confirmation(
            report, out, {c.task: c for c in cohorts}, {t: info["weights"] for t, info in report["tasks"].items()},
            confirm, arch=settings.arch, workers=settings.workers, progress=progress)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_accuracy_report(report, out)
    return report


def _record(row: Row, cohort: PreparedCohort, seed: int, out: Path, settings: AccuracyBenchSettings,
            progress: bool) -> dict[str, Any]:
    """One run's record; a failing run gives a record with its error instead of stopping the benchmark."""
    task = cohort.settings.task
    run_dir = runs_folder(out, cohort.weights, cohort.arch) / task / row.name / f"seed{seed}"
    record: dict[str, Any] = {"task": task, "row": row.name, "seed": seed, "run_dir": str(run_dir)}
    config = run_config(row, cohort, seed, run_dir, settings)
    saved = finished_run(run_dir, config)  # a settings conflict concerns every run: it stops the benchmark
    try:
        record.update(saved or train_and_evaluate(row, config, run_dir,
                                                  keep_last_checkpoint=settings.keep_last_checkpoint))
    except WsilocalError as exc:  # one failing run does not stop a benchmark of hours
        record["error"] = str(exc)
    log_progress(progress, f"[{task}] {row.label} seed {seed}: {record_line(record)}")
    return record


def record_line(record: dict[str, Any]) -> str:
    """A run's record as one progress line: its metrics and seconds (or "reused"), or its error."""
    if "error" in record:
        return f"FAILED: {record['error']}"
    return (" ".join(f"{METRIC_LABELS[m]} {_num(record[m])}" for m in METRICS)
            + (" (reused)" if record["reused"] else f" ({record['seconds']:.0f} s)"))


def failure_status(records: Sequence[dict[str, Any]]) -> str | None:
    """A row's status where some of its seeds failed (the first error named); None where none did."""
    failed = [r for r in records if r.get("error")]
    return f"failed ({len(failed)} of {len(records)} seeds): {failed[0]['error']}" if failed else None


def labels_of_test_split(cohort_csv: Path, classes: Sequence[str]) -> list[int]:
    """The class indices of a cohort's test slides, in the CSV's order."""
    from wsilocal.slide.cohort import load_cohort

    return [classes.index(s.label) for s in load_cohort(cohort_csv).split("test")]


# --- report --------------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _mean_std(summary: dict[str, Any]) -> str:
    if summary["mean"] is None:
        return "—"
    return _num(summary["mean"]) + ("" if summary["std"] is None else f" ± {_num(summary['std'])}")


def _cell(agg: dict[str, Any], metric: str) -> str:
    """``mean ± std [low, high]``: the seed mean, its std over seeds and its 95 % bootstrap interval over slides;
    ``†`` where the per-slide predictions' own seed mean differs (:func:`_rounded_away`)."""
    interval = (agg.get("bootstrap") or {}).get(metric)
    text = _mean_std(agg[metric])
    if interval is None or text == "—":
        return text
    return f"{text} [{_num(interval['low'])}, {_num(interval['high'])}]" + ("†" if _rounded_away(agg, metric) else "")


def _rounded_away(agg: dict[str, Any], metric: str) -> bool:
    """Whether the per-slide predictions (6 decimals, as ``predictions_test.csv`` holds them) give another seed mean
    than the runs' own evaluations: scores they told apart come back tied."""
    interval = (agg.get("bootstrap") or {}).get(metric)
    return interval is not None and abs(interval["estimate"] - agg[metric]["mean"]) >= 5e-4


def format_difference(difference: dict[str, Any]) -> str:
    """``+0.120 [+0.040, +0.210]``: a paired difference and its 95 % interval."""
    return f"{difference['estimate']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]"


def format_paired_table(report: dict[str, Any], task: str) -> str:
    """Markdown: the paired differences behind the report's claims on ``task`` (:func:`paired_comparisons`), or
    "" where none of the claims' rows ran."""
    entries = [p for p in report.get("paired") or paired_comparisons(report) if p["task"] == task]
    if not entries:
        return ""
    lines = ["Paired differences behind the report's claims: the claim's row less the other row, on the test slides "
             "both scored, with the 95 % bootstrap interval over those slides (stratified by class, the same "
             "resampled slides for both, the metric averaged over seeds on each resample). The claim holds against "
             "a row where the interval lies above 0.", "",
             "| claim | other row | metric | slides | difference [95 % interval] | reading |",
             "|---|---|---|---:|---:|---|"]
    for p in entries:
        d, other = p["difference"], ROWS[p["other"]].label
        if d is None:
            lines.append(f"| {p['claim']} | {other} | {METRIC_LABELS[p['metric']]} | | — | {p['note']} |")
            continue
        read = {"higher": f"{ROWS[p['row']].label} higher", "lower": f"{other} higher",
                "unclear": "cannot tell (holds 0)"}[reading(d)]
        lines.append(f"| {p['claim']} | {other} | {METRIC_LABELS[p['metric']]} | {d['n_slides']} | "
                     f"{format_difference(d)} | {read} |")
    return "\n".join(lines)


def format_accuracy_tables(report: dict[str, Any]) -> str:
    """Markdown: per task, every row's mean ± std over seeds and 95 % bootstrap interval over test slides beside
    the paper's numbers on the dataset with the same number of classes (Table 1; the ablation rows without RFR
    from Table 4), then the paired differences behind the report's claims."""
    parts = []
    for task, info in report["tasks"].items():
        dataset = info["paper_dataset"]
        slides = ", ".join(f"{split} {n}" for split, n in info["slides"].items())
        lines = [f"### Task `{task}`: {len(info['classes'])} classes ({', '.join(info['classes'])}); slides {slides}",
                 "", f"| method | accuracy | balanced accuracy | AUROC | seeds | s/run | paper accuracy ({dataset}, "
                     "GPU) | paper AUROC |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for agg in (a for a in report["aggregates"] if a["task"] == task):
            paper_acc, paper_auroc = paper_numbers(agg["row"], dataset)
            paper = f"| {_num(paper_acc, 4)} | {_num(paper_auroc, 4)} |"
            if agg["status"] != "done" and agg["accuracy"]["n"] == 0:
                lines.append(f"| {agg['label']} | {agg['status']} | | | | {paper}")
                continue
            seconds = "—" if agg["seconds_per_run"] is None else f"{agg['seconds_per_run']:.0f}"
            note = "" if agg["status"] == "done" else f" ({agg['status']})"
            lines.append(f"| {agg['label']}{note} | " + " | ".join(_cell(agg, m) for m in METRICS)
                         + f" | {agg['accuracy']['n']} | {seconds} {paper}")
        rounded = [f"{a['label']} {METRIC_LABELS[m]} {a['bootstrap'][m]['estimate']:.3f}"
                   for a in report["aggregates"] if a["task"] == task and a.get("bootstrap")
                   for m in METRICS if a[m]["mean"] is not None and _rounded_away(a, m)]
        if rounded:
            lines += ["", f"† The interval is of the per-slide probabilities as `{PREDICTIONS_FILE}` holds them, to 6 "
                          "decimals, which ties scores the run's own evaluation told apart (saturated outputs); "
                          "their seed mean, which the report's paired differences use: " + "; ".join(rounded) + "."]
        without = [a for a in report["aggregates"] if a["task"] == task and a.get("bootstrap_note")]
        if without:
            notes = "; ".join(sorted({a["bootstrap_note"] for a in without}))
            lines += ["", f"No interval for {', '.join(a['label'] for a in without)} ({notes}): ± is the seed spread "
                          "alone, and the report decides their claims on it."]
        if info.get("shortcuts"):  # reports written before the check have none
            lines += ["", "Shortcut check: how well one number per slide alone ranks the test slides (AUROC, its "
                      "direction learnt on the training split; ~0.5 when the classes differ only in their tissue): "
                      + ", ".join(f"{name} {_num(v, 2)}" for name, v in info["shortcuts"].items()) + "."]
        if info.get("chance_95"):  # likewise
            levels = info["chance_95"]
            lines += ["", f"Chance on this test split: random scores reach balanced accuracy "
                      f"{_num(levels['balanced_accuracy'], 2)} and AUROC {_num(levels['auroc'], 2)} one time in 20 "
                      "(the report's claims need a row to beat that)."]
        paired = format_paired_table(report, task)
        if paired:
            lines += ["", paired]
        if info["feature_skipped"]:
            lines += ["", f"Tile features skipped {len(info['feature_skipped'])} slide(s) (MIL rows do without them): "
                      + "; ".join(f"{k}: {v}" for k, v in info["feature_skipped"].items())]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def describe_settings(report: dict[str, Any]) -> str:
    """Markdown list: how each cohort was made and read, and how the methods were trained."""
    s = report["settings"]
    lines = []
    for c in s["cohorts"]:
        task = c["task"]
        if task not in report["tasks"]:
            continue
        p = report["tasks"][task]["synth_params"]
        extra = (f", layout × {c['layout_scale']:g} (tile {p['context_tile_um']:g} µm, near gap "
                 f"{p['context_near_um'][0]:g}–{p['context_near_um'][1]:g} µm, far {p['context_far_um'][0]:g}–"
                 f"{p['context_far_um'][1]:g} µm)" if task == "context" else
                 f", lesion {p['lesion_fraction'][0]:.0%}–{p['lesion_fraction'][1]:.0%} of the tissue, "
                 f"stain variation {p['stain_variation']:g}")
        jitter = "+0–25" if task == "context" else "±25"  # the generator only enlarges a context slide
        lines.append(f"- `{task}`: {c['slides_per_class']} slides per class, level 0 {p['size'][0]}×{p['size'][1]} "
                     f"px at 0.25 µm/px ({jitter} % size jitter){extra}; splits {c['splits']} per class; read at "
                     f"{c['mpp']:g} µm/px by every method; MIL tiles {c['tile']} px ({c['tile'] * c['mpp']:g} µm).")
    d, weights = s["demo"], s.get("weights")
    title = {"resnet18": "ResNet18", "resnet50": "ResNet50"}.get(s.get("arch", "resnet34"), "ResNet34")
    mil_epochs = s["mil_epochs"] or "the model's published count"
    inits = {info.get("init") for info in report["tasks"].values()}
    pretrained = bool(inits & {"pretrained", "proxy"})
    lr_trunk = TrainConfig.lr_trunk if weights or pretrained else d["lr_trunk"]
    if "proxy" in inits:
        p = s.get("proxy") or {}
        first = f"the weights in {weights}" if weights else "the task's `wsilocal pretrain` weights"
        start = features = (
            f"the weights of a SUPERVISED proxy pretraining (tissue type per map cell — lesion, follicle, other "
            f"tissue — from the generator's masks of {s.get('proxy_slides_per_class')} slides per class of the "
            f"task's generator with seed + {PROXY_SEED_OFFSET}, none of the benchmark's, their labels never read; "
            f"{', '.join(f'{k} {v}' for k, v in p.items()) or 'default settings'}) started from {first}")
    elif weights:
        start = features = f"the weights in {weights}"
    elif pretrained:
        p = s.get("pretrain") or {}
        start = features = ("the weights of `wsilocal pretrain` on the task's own train and val slides (never its "
                            f"test split; {', '.join(f'{k} {v}' for k, v in p.items()) or 'default settings'})")
    else:
        start, features = "random initial weights", f"a randomly initialised {title} (no ImageNet weights offline)"
    lines += [f"- trunk of every method: {title}.",
              f"- ours: epochs {s['epochs']} (greedy: per module), lr trunk {lr_trunk:g}, lr auxiliary "
              f"{d['lr_aux']:g}, accumulation {d['accumulation']}, {d['rfr_patches']} RFR patches (the demo's "
              f"settings), {start}.",
              f"- MIL baselines: epochs {mil_epochs}, each model's published optimiser, {title} features from "
              f"{features}.",
              f"- seeds {report['seeds']}: the seed sets initial weights and data order; the splits stay fixed. "
              "± is the sample standard deviation over seeds; [low, high] the 95 % percentile bootstrap interval "
              f"over test slides ({RESAMPLES} resamples stratified by class, the metric averaged over seeds on "
              "each resample), which the report's claims are decided on."]
    return "\n".join(lines)


def _error_bar(agg: dict[str, Any], metric: str) -> tuple[float, float]:
    """Below and above the bar: to the 95 % bootstrap interval's ends, else (no per-slide predictions) one std."""
    summary, interval = agg[metric], (agg.get("bootstrap") or {}).get(metric)
    if summary["mean"] is None:
        return 0.0, 0.0
    if interval is None:
        return summary["std"] or 0.0, summary["std"] or 0.0
    return max(summary["mean"] - interval["low"], 0.0), max(interval["high"] - summary["mean"], 0.0)


def plot_accuracy(report: dict[str, Any], path: str | Path, slides: str = "test slides") -> None:
    """One panel per task: bars of mean accuracy, balanced accuracy and AUROC per method, the 95 % bootstrap
    interval over the ``slides`` scored as error bars (one std over seeds for runs without per-slide predictions)."""
    plt = pyplot()

    tasks = list(report["tasks"])
    fig, axes = plt.subplots(len(tasks), 1, figsize=(12, 4.2 * max(1, len(tasks))), squeeze=False)
    width = 0.27
    for ax, task in zip(axes[:, 0], tasks, strict=True):
        rows = [a for a in report["aggregates"] if a["task"] == task and a["accuracy"]["n"] > 0]
        for j, metric in enumerate(METRICS):
            means = [a[metric]["mean"] if a[metric]["mean"] is not None else math.nan for a in rows]
            errors = np.array([_error_bar(a, metric) for a in rows]).reshape(-1, 2).T
            ax.bar([i + (j - 1) * width for i in range(len(rows))], means, width, yerr=errors, capsize=2,
                   label=METRIC_LABELS[metric])
        dataset = report["tasks"][task]["paper_dataset"]
        paper = [(i - width, paper_numbers(a["row"], dataset)[0]) for i, a in enumerate(rows)]
        paper = [(x, y) for x, y in paper if y is not None]
        if paper:
            ax.plot(*zip(*paper, strict=True), "kD", markersize=5, label=f"paper accuracy ({dataset}, GPU)")
        ax.set_xticks(range(len(rows)), [a["label"] for a in rows], rotation=30, ha="right", fontsize=8)
        chance = 1 / len(report["tasks"][task]["classes"])
        ax.axhline(chance, color="gray", linestyle=":", label=f"chance accuracy ({chance:.2f})")
        for metric, style in (("balanced_accuracy", "--"), ("auroc", "-.")):
            level = (report["tasks"][task].get("chance_95") or {}).get(metric)
            if level is not None:
                ax.axhline(level, color="gray", linestyle=style, linewidth=0.8,
                           label=f"{METRIC_LABELS[metric]} of random scores, 1 time in 20 ({level:.2f})")
        ax.set_ylim(0, 1.12)
        seed_spread = any(a.get("bootstrap") is None for a in rows)
        ax.set_title(f"task {task}: seed mean, 95 % bootstrap interval over {slides}"
                     + (" (± std over seeds where no per-slide predictions)" if seed_spread else ""))
        ax.legend(fontsize=7, ncol=5, loc="upper left")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_accuracy_report(report: dict[str, Any], out: str | Path) -> None:
    """Write ``accuracy.json`` (settings, records, aggregates, the paper's tables), ``accuracy.md`` and
    ``accuracy.png`` into ``out``."""
    import torch  # its version and device go into the report; the module loads without it

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report["machine"] = {"torch": torch.__version__, "cpu_count": os.cpu_count(),
                         "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    report["paper"] = {"table1": PAPER_TABLE1, "table4": PAPER_TABLE4, "datasets": PAPER_DATASETS,
                       "note": "Zhang et al., MICCAI 2022: real slides (TCGA-NSCLC, TCGA-RCC, LKS) at 5x, "
                               "ImageNet-pretrained ResNet34, GPUs"}
    report["paired"] = paired_comparisons(report)
    write_text_atomic(out / "accuracy.json", json.dumps(report, indent=1))
    confirmation = format_confirmation(report)
    text = (f"# Accuracy benchmark ({report['date']}, {report['seconds'] / 60:.1f} min, torch {torch.__version__}, "
            f"{os.cpu_count()} CPUs)\n\n{describe_settings(report)}\n\n{format_accuracy_tables(report)}\n"
            + (f"\n{confirmation}\n" if confirmation else ""))
    write_text_atomic(out / "accuracy.md", text)
    plot_accuracy(report, out / "accuracy.png")
    write_confirmation_plot(report, out)


# --- confirmation: every finished run scored on a fresh test cohort (--confirm N) ---------------------------
# `wsilocal bench accuracy --confirm N`: every finished run scored again on a fresh, independent test cohort.
#
# A test split of ~70 slides decides a difference of ~0.05 in balanced accuracy only when it is far from 0. Where a
# claim stays undecided, scoring more of the *same* test split's kind is the honest next step only if the new slides
# are a new sample — never seen by any run, any pretraining or any choice — and if the claim is decided on them
# alone, not pooled with the slides that left it undecided. This section does that:
#
# - the confirmation cohort of a task is generated with the task's settings but another generator seed (the task's
#   seed + `CONFIRM_SEED_OFFSET`), `N` slides per class, all in the test split, into
#   `OUT/cohorts/<task>-confirm-<N>` (its own cache, and tile features made with the task's weights);
# - each finished run of the task (ours, StreamingCNN, MIL rows; every seed) is evaluated on it as it is
#   (`wsilocal evaluate RUN --cohort CSV --out RUN/confirm-<N>`: no training, no choice), reused when run again;
# - the rows' seed means, their 95 % bootstrap intervals and the paired differences behind the paper's claims are
#   computed on the confirmation slides only, the same way as on the test split, and reported beside it
#   (`OUT/accuracy.md` section "Confirmation", `OUT/accuracy_confirmation.png`).

CONFIRM_SEED_OFFSET = 1000  # the confirmation cohort's generator seed is the task's + this: slides no run has seen
CONFIRM_MARKER = "confirm.json"  # written last into RUN/confirm-<N>: the evaluation finished, on this cohort CSV


def confirmation_settings(cohort_settings: CohortSettings, slides_per_class: int) -> CohortSettings:
    """The task's cohort settings for its confirmation cohort: another seed, ``slides_per_class``, all test."""
    if slides_per_class < 1:
        raise ConfigError(f"bench accuracy: --confirm must be at least 1 slide per class, got {slides_per_class}")
    return replace(cohort_settings, slides_per_class=slides_per_class, seed=cohort_settings.seed + CONFIRM_SEED_OFFSET,
                   splits=(0.0, 0.0, 1.0))


def confirmation_folder(run_dir: str | Path, slides_per_class: int) -> Path:
    """Where a run's evaluation on a confirmation cohort of ``slides_per_class`` slides per class lies."""
    return Path(run_dir) / f"confirm-{slides_per_class}"


def _csv_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def confirm_run(record: dict[str, Any], cohort: PreparedCohort, slides_per_class: int,
                progress: bool = False) -> dict[str, Any]:
    """Evaluate one finished run (a benchmark record) on the confirmation cohort, or reuse that evaluation.

    Returns a record like the benchmark's — task, row, seed, the metrics, ``n_test``, ``seconds`` (of the
    evaluation) and ``test_predictions`` (the confirmation slides') — with ``error`` instead where it failed.
    """
    from wsilocal.run.directory import RunDirectory
    from wsilocal.train.evaluate import evaluate_run

    result: dict[str, Any] = {k: record[k] for k in ("task", "row", "seed", "run_dir")}
    folder = confirmation_folder(record["run_dir"], slides_per_class)
    marker, digest = folder / CONFIRM_MARKER, _csv_digest(cohort.csv)
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved.get("cohort_sha256") == digest:
            predictions = read_test_predictions(folder)
            if predictions is not None:
                return {**result, **saved["result"], "test_predictions": predictions, "reused": True}
    start = time.perf_counter()
    try:
        baseline = RunDirectory(record["run_dir"]).is_baseline
        metrics = evaluate_run(record["run_dir"], "test", cohort=cohort.csv, out=folder, cache=cohort.cache,
                               features=cohort.features if baseline else None, progress=progress)
    except WsilocalError as exc:  # one failing run does not stop the others
        return {**result, "error": str(exc)}
    saved_result = {**{m: metrics[m] for m in METRICS}, "n_test": metrics["n"],
                    "seconds": round(time.perf_counter() - start, 1), "skipped": metrics.get("skipped") or {}}
    write_text_atomic(marker, json.dumps({"cohort": str(cohort.csv), "cohort_sha256": digest,
                                          "result": saved_result}, indent=1))
    return {**result, **saved_result, "test_predictions": read_test_predictions(folder), "reused": False}


def run_confirmation(report: dict[str, Any], out: Path, cohorts: dict[str, CohortSettings],
                     weights: dict[str, str | None], slides_per_class: int, *, arch: str, workers: int,
                     progress: bool = True) -> dict[str, Any]:
    """Score every finished run of ``report`` on its task's confirmation cohort; returns the report's
    ``confirmation`` section: per task the cohort and its chance levels, then records, aggregates and the paired
    differences (as the benchmark's own, on the confirmation slides only)."""
    section: dict[str, Any] = {"slides_per_class": slides_per_class, "seed_offset": CONFIRM_SEED_OFFSET, "tasks": {},
                               "records": [], "aggregates": []}
    for task, cohort_settings in cohorts.items():
        settings = confirmation_settings(cohort_settings, slides_per_class)
        folder = out / "cohorts" / f"{task}-confirm-{slides_per_class}"
        cohort = prepare_benchmark_cohort(settings, folder, workers=workers, weights=weights[task], arch=arch,
                                          progress=progress)
        classes = class_names(cohort_settings.classes, task)
        labels = labels_of_test_split(cohort.csv, classes)
        info = report["tasks"][task]
        section["tasks"][task] = {"classes": classes, "slides": {"test": len(labels)}, "csv": str(cohort.csv),
                                  "seed": settings.seed, "paper_dataset": info["paper_dataset"],
                                  "feature_skipped": cohort.feature_skipped, "seconds": cohort.seconds,
                                  "synth_params": asdict(settings.synth_params()),
                                  "chance_95": chance_levels(labels, len(classes))}
        finished = [r for r in report["records"] if r["task"] == task and not r.get("error")]
        for record in finished:
            confirmed = confirm_run(record, cohort, slides_per_class)
            section["records"].append(confirmed)
            log_progress(progress, f"[{task} confirmation] {ROWS[record['row']].label} seed {record['seed']}: "
                                   f"{record_line(confirmed)}")
        for agg in (a for a in report["aggregates"] if a["task"] == task):
            records = [r for r in section["records"] if r["task"] == task and r["row"] == agg["row"]]
            if records:
                section["aggregates"].append({"task": task, "row": agg["row"], "label": agg["label"],
                                              "status": failure_status(records) or "done", **aggregate(records)})
    section["paired"] = paired_comparisons(section)
    return section


def format_confirmation(report: dict[str, Any]) -> str:
    """Markdown: the confirmation section (:func:`run_confirmation`) as the benchmark's own tables; "" if none."""
    section = report.get("confirmation")
    if not section:
        return ""
    n = section["slides_per_class"]
    return (f"## Confirmation: every finished run scored on {n} fresh test slides per class\n\n"
            f"A second, independent test cohort per task (generator seed + {section['seed_offset']}, never seen by "
            "any run, pretraining or choice): the runs above, as they are, scored on it alone. A claim the test "
            "split left undecided is decided here, on these slides only.\n\n" + format_accuracy_tables(section))


def write_confirmation_plot(report: dict[str, Any], out: Path) -> None:
    """``accuracy_confirmation.png``: the confirmation rows as :func:`plot_accuracy` draws the benchmark's."""
    if report.get("confirmation"):
        section = report["confirmation"]
        plot_accuracy(section, out / "accuracy_confirmation.png",
                      slides=f"{section['slides_per_class']} fresh confirmation slides per class")


# --- command line --------------------------------------------------------------------------------------------


def accuracy_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments; print the tables and where the files are."""
    settings = (QUICK if args.quick else FULL).with_budget(
        epochs=args.epochs, mil_epochs=args.mil_epochs, slides_per_class=args.slides_per_class)
    if args.weights is not None:
        settings = replace(settings, weights=str(Path(args.weights).resolve()))
    if args.init is not None:
        settings = replace(settings, init=args.init)
    settings = replace(settings, arch=args.arch)
    if args.pretrain_steps is not None:
        if args.pretrain_steps < 1:
            raise ConfigError(f"bench accuracy: --pretrain-steps must be at least 1, got {args.pretrain_steps}")
        settings = replace(settings, pretrain={**settings.pretrain, "steps": args.pretrain_steps})
    report = run_accuracy_benchmark(args.out, settings, tasks=args.tasks, rows=args.rows, seeds=args.seeds,
                                    confirm=args.confirm)
    print(format_accuracy_tables(report))
    if report.get("confirmation"):
        print(format_confirmation(report))
    print(f"wrote {Path(args.out) / 'accuracy.json'}, accuracy.md, accuracy.png ({report['seconds'] / 60:.1f} min)")
    return 1 if any(a["status"].startswith("failed") for a in report["aggregates"]) else 0
