"""Typed run configuration: YAML in, command-line overrides, validated, saved resolved beside every run.

Every field of :class:`TrainConfig` can be set in a YAML file and overridden on the command line as
``--field-name VALUE`` (``--no-field`` for booleans that default to true). Unknown keys, wrong types and
out-of-range values raise :class:`~wsilocal.errors.ConfigError` with a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from wsilocal.atomic import write_text_atomic
from wsilocal.errors import ConfigError

SCHEDULES = ("simultaneous", "greedy")
LR_SCHEDULES = ("plateau", "cosine")
BEST_BY = ("balanced_accuracy", "loss", "auroc")  # the validation figure that picks checkpoint_best among epochs
MAX_RFR_PATCHES = 1000  # the paper uses 10; more only costs memory
METHODS = ("local", "streaming")  # streaming = the StreamingCNN baseline (end-to-end, K=1)
BASELINE_METHOD = "baseline"  # a tile-based MIL baseline run (`wsilocal baseline`, BaselineConfig)
STREAM_STORES = ("auto", "memory", "disk")
NORMALISATIONS = ("auto", "imagenet", "dataset")
ARCHS = ("resnet18", "resnet34", "resnet50")  # the trunks of wsilocal.models.resnet; resnet34 is the paper's
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision-layout weights expect their input normalised with
IMAGENET_STD = (0.229, 0.224, 0.225)


# What a run configured before a field existed did, where that differs from the field's default today: a saved
# config (or a benchmark's record of one) without the field is read with this value, not the new default.
VALUE_BEFORE_FIELD: dict[str, object] = {"mask_glass": False}


@dataclass
class TrainConfig:
    """Everything a training run needs. Defaults follow the paper and the authors' code."""

    # --- data
    cohort: str = ""  # cohort CSV (slide_id,path,label,split[,case_id])
    out: str = ""  # run directory
    cache: str = ""  # 5x cache folder; empty = "<cohort folder>/cache"
    mpp: float = 2.0  # target resolution in µm/px (2.0 ≈ 5x)
    assume_mpp: float | None = None  # MPP for slides without resolution metadata
    max_pixels: int = 1_600_000_000  # refuse slides larger than this at the target MPP
    workers: int = 1  # processes for preparing the cache
    allow_outside_paths: bool = False  # allow cohort paths leading outside the CSV's folder
    # Refuse to start when a slide file of the cohort is missing or unreadable (every problem listed at once). Off:
    # such slides are skipped and listed with their reason, the rest finish, and the command exits with 1.
    strict: bool = False
    # --- model
    arch: str = "resnet34"  # trunk: resnet18, resnet34 (the paper's) or resnet50; runs saved without it are resnet34
    method: str = "local"  # "local" (the paper's method) or "streaming" (StreamingCNN: K=1, exact, tiled)
    k: int = 4  # number of gradient-isolated modules: 1 (end-to-end), 2, 4 or 8
    boundaries: list[int] | None = None  # explicit module start units (overrides k), e.g. [3, 5, 7]
    balanced: bool = False  # place K boundaries at block level for even memory per module
    weights: str | None = None  # state dict of the arch (.pth/.pt/.bin/.safetensors, SSL checkpoints); none = random
    # input normalisation: "auto" = ImageNet's mean/std with weights (torchvision-layout weights, ImageNet's and
    # `wsilocal pretrain`'s alike, were trained on it, and their stem and BatchNorm stay frozen), else the training
    # slides' own; or "imagenet" / "dataset" explicitly
    normalisation: str = "auto"
    conv1_stride: int = 3
    fold_bn: bool = True  # fold frozen BatchNorm into convolutions (exact; less memory)
    recompute: bool = False  # activation recomputation inside each module
    rfr: bool = True  # random feature reconstruction in the auxiliary models
    alpha: float = 1.0  # weight of the RFR loss
    rfr_patches: int = 10
    # Leave the glass out of the classifiers' attention: H and every auxiliary classifier attend only to the map
    # positions whose cell of the image holds tissue, in training, validation and prediction alike. model.json
    # records it; runs without the record (trained before it existed) attend to every position.
    mask_glass: bool = True
    # Beyond the paper: channels of a context block before H's attention (1×1 conv, then 3×3 convs dilated 1, 2,
    # 4: H reads relations between neighbouring positions, not only what each holds); 0 = the paper's H.
    head_context: int = 0
    # --- optimisation
    schedule: str = "simultaneous"  # or "greedy": module 1 to convergence, then module 2, ...
    epochs: int = 30  # per module under the greedy schedule
    accumulation: int = 8  # slides per optimizer step
    lr_trunk: float = 1e-5
    lr_aux: float = 2e-5  # auxiliary models and final classifier
    weight_decay: float = 1e-6
    # "plateau" (the paper): lr ×plateau_factor when the validation loss stalls. "cosine": each phase's rates
    # fall along a half cosine to zero over its epochs, whatever a small, noisy validation split says.
    lr_schedule: str = "plateau"
    plateau_patience: int = 3  # epochs without validation-loss improvement before lr ×plateau_factor
    plateau_factor: float = 0.1
    early_stopping: int = 10  # epochs without improvement before stopping; 0 = never
    # Which epoch checkpoint_best.pt keeps: the best validation balanced accuracy (ties: lower loss), the lowest
    # validation loss, or the best AUROC. On a split of ~10 slides balanced accuracy moves in steps of ~0.1, so
    # "loss", which moves smoothly, picks less by luck.
    best_by: str = "balanced_accuracy"
    class_weights: bool = False  # inverse-frequency class weights in the cross-entropy
    # --- augmentation
    augment: bool = True
    edge_crop: float = 0.1  # random crop of up to this fraction from each edge
    color_jitter: float = 0.05  # brightness/contrast/saturation jitter strength
    # --- misc
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch CPU threads; 0 = torch's default
    calibration_slides: int = 8  # slides used to set BatchNorm statistics of a random-init trunk
    # Random init only: re-measure those statistics after every epoch. Frozen statistics measured once stop
    # normalising as a random trunk's weights move far, and training then collapses (see docs/method.md).
    recalibrate_bn: bool = False
    max_train_pixels: int = 64_000_000  # a training slide larger than this is refused with advice
    # --- streaming (memory bounded by a tile instead of the slide; same gradients)
    streaming: bool = False  # stream every slide; otherwise only slides that would not fit memory_budget_gb
    stream_tile: int = 4096  # output block per window in image pixels (each window adds its halo)
    stream_store: str = "auto"  # where x_i waits: "memory", "disk" (mmap); auto: memory on GPU, on CPU half the budget
    memory_budget_gb: float | None = None  # per-step budget for choosing streaming; none = share of free memory

    def validate(self) -> TrainConfig:
        """Check values that types alone do not; return self."""
        checks = [
            (bool(self.cohort), "cohort: a cohort CSV is required"),
            (bool(self.out), "out: a run directory is required"),
            (self.mpp > 0, f"mpp must be positive, got {self.mpp}"),
            (self.assume_mpp is None or self.assume_mpp > 0, "assume_mpp must be positive"),
            (self.arch in ARCHS, f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"),
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.normalisation in NORMALISATIONS,
             f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {self.normalisation!r}"),
            (self.method != "streaming" or (self.k == 1 and self.boundaries is None),
             "method streaming is end-to-end training (StreamingCNN): it needs k 1 (use --streaming for "
             "streamed local learning with K modules)"),
            (self.stream_store in STREAM_STORES,
             f"stream_store must be one of {', '.join(STREAM_STORES)}, got {self.stream_store!r}"),
            (self.stream_tile >= 64, f"stream_tile must be >= 64 px, got {self.stream_tile}"),
            (self.memory_budget_gb is None or self.memory_budget_gb > 0, "memory_budget_gb must be positive"),
            (self.k in (1, 2, 4, 8) or self.boundaries is not None,
             f"k must be 1, 2, 4 or 8 (or give boundaries), got {self.k}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.accumulation >= 1, f"accumulation must be >= 1, got {self.accumulation}"),
            (self.lr_trunk >= 0 and self.lr_aux > 0, "learning rates must be positive"),
            (0 <= self.edge_crop < 0.5, f"edge_crop must be in [0, 0.5), got {self.edge_crop}"),
            (0 <= self.color_jitter <= 0.5, f"color_jitter must be in [0, 0.5], got {self.color_jitter}"),
            (self.alpha >= 0, f"alpha must be >= 0, got {self.alpha}"),
            (self.rfr_patches >= 1, f"rfr_patches must be >= 1, got {self.rfr_patches}"),
            (self.head_context >= 0, f"head_context must be >= 0 (0: the paper's H), got {self.head_context}"),
            (self.conv1_stride in (1, 2, 3, 4), f"conv1_stride must be 1-4, got {self.conv1_stride}"),
            (0 < self.plateau_factor < 1, f"plateau_factor must be in (0, 1), got {self.plateau_factor}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (self.threads >= 0, f"threads must be >= 0 (0 = torch's default), got {self.threads}"),
            (self.max_pixels >= 1, f"max_pixels must be >= 1, got {self.max_pixels}"),
            (self.max_train_pixels >= 1, f"max_train_pixels must be >= 1, got {self.max_train_pixels}"),
            (self.calibration_slides >= 1, f"calibration_slides must be >= 1, got {self.calibration_slides}"),
            (self.early_stopping >= 0, f"early_stopping must be >= 0, got {self.early_stopping}"),
            (self.plateau_patience >= 0, f"plateau_patience must be >= 0, got {self.plateau_patience}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.rfr_patches <= MAX_RFR_PATCHES, f"rfr_patches must be <= {MAX_RFR_PATCHES}, got {self.rfr_patches}"),
            *shared_checks(self),
        ]
        raise_problems(checks)
        if self.boundaries is not None:
            from wsilocal.models.split import block_boundaries  # torch: only loaded when boundaries are given

            block_boundaries(self.boundaries, self.arch)  # ConfigError naming the rule when they are not a valid split
        return self

    def resolved_cache(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.cohort).parent / "cache"


def raise_problems(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first check that failed (each check: (ok, message))."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"config: {message}")


def number_checks(config) -> list[tuple[bool, str]]:
    """Checks every config class shares: finite numbers and a seed the random generators accept."""
    infinite = [f.name for f in fields(config) if isinstance(getattr(config, f.name), float)
                and not math.isfinite(getattr(config, f.name))]
    return [
        (not infinite, f"{', '.join(infinite)} must be finite numbers"),
        (0 <= config.seed < 2**31, f"seed must be in 0..2147483647, got {config.seed}"),
    ]


def shared_checks(config) -> list[tuple[bool, str]]:
    """Checks the training configs share: :func:`number_checks` and a known ``best_by``."""
    return [
        *number_checks(config),
        (config.best_by in BEST_BY, f"best_by must be one of {', '.join(BEST_BY)}, got {config.best_by!r}"),
    ]


PRETRAIN_OBJECTIVES = ("simclr", "vicreg")  # see wsilocal.pretrain.objectives


@dataclass
class PretrainConfig:
    """Self-supervised pretraining of the trunk on unlabeled slides (``wsilocal pretrain``; docs/pretraining.md).

    The slides are a cohort CSV's (labels never read; the test split only with ``include_test``) or those that
    ``slides`` names (a folder, searched recursively, or a glob pattern); both may be given.
    """

    # --- data
    cohort: str = ""  # cohort CSV; its train and val slides (and test with include_test)
    slides: str = ""  # a folder of slide files or a glob pattern ("/data/**/*.svs")
    include_test: bool = False  # also pretrain on the cohort's test split (off: no test slide is seen)
    out: str = ""  # output folder: <arch>.safetensors, pretrain.json, loss_curve.png, checkpoint.pt
    arch: str = "resnet34"  # the trunk pretrained: resnet18, resnet34 or resnet50
    mpp: float = 2.0  # resolution of the tiles in µm/px (2.0 ≈ 5x, the whole-slide training's)
    assume_mpp: float | None = None  # MPP for slides without resolution metadata
    tile: int = 128  # edge of a read tile in px at mpp; views are random crops of it
    min_tissue: float = 0.5  # least tissue share of a tile (on the overview mask)
    # --- objective and augmentation
    objective: str = "vicreg"  # vicreg (no negatives: fits small batches) or simclr; see docs/pretraining.md
    projector_dims: list[int] = dataclasses.field(default_factory=lambda: [1024, 1024])
    temperature: float = 0.2  # simclr's τ
    crop: int = 96  # edge of a view in px
    crop_scale_min: float = 0.35  # least share of the tile's area a view's crop covers
    stain_jitter: float = 0.05  # σ of the H&E stain jitter (scale U(1±σ), shift U(±σ) per stain)
    colour_jitter: float = 0.2  # brightness, contrast, saturation U(1±x)
    blur: float = 0.5  # probability of a Gaussian blur
    # --- optimisation
    steps: int = 3000  # optimizer steps
    batch_size: int = 64  # tiles per step and process (two views each)
    lr: float = 1e-3  # AdamW peak rate, reached after warmup_steps, then a half cosine to 0
    warmup_steps: int = 100
    weight_decay: float = 1e-5
    seed: int = 0
    # --- execution
    device: str = "auto"  # auto = cuda when available
    threads: int = 0  # torch threads (0 = torch's default)
    workers: int = 2  # threads reading tiles
    checkpoint_every: int = 100  # steps between checkpoints (Ctrl-C also saves one)
    bn_tiles: int = 1024  # un-augmented tiles that re-estimate the BatchNorm statistics at the end

    def validate(self) -> PretrainConfig:
        """Check values that types alone do not; return self."""
        checks = [
            (bool(self.cohort or self.slides), "pretrain needs --cohort CSV or --slides FOLDER_OR_GLOB"),
            (bool(self.out), "out: an output folder is required"),
            (self.arch in ARCHS, f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}"),
            (self.mpp > 0, f"mpp must be positive, got {self.mpp}"),
            (self.assume_mpp is None or self.assume_mpp > 0, "assume_mpp must be positive"),
            (self.tile >= 32, f"tile must be >= 32 px, got {self.tile}"),
            (32 <= self.crop <= self.tile, f"crop must be in 32..tile ({self.tile}), got {self.crop}"),
            (0 < self.crop_scale_min <= 1, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}"),
            (0 <= self.min_tissue <= 1, f"min_tissue must be in [0, 1], got {self.min_tissue}"),
            (self.objective in PRETRAIN_OBJECTIVES,
             f"objective must be one of {', '.join(PRETRAIN_OBJECTIVES)}, got {self.objective!r}"),
            (len(self.projector_dims) >= 1 and min(self.projector_dims) >= 1,
             f"projector_dims must be positive sizes, got {self.projector_dims}"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (0 <= self.stain_jitter < 1, f"stain_jitter must be in [0, 1), got {self.stain_jitter}"),
            (0 <= self.colour_jitter < 1, f"colour_jitter must be in [0, 1), got {self.colour_jitter}"),
            (0 <= self.blur <= 1, f"blur must be in [0, 1], got {self.blur}"),
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (the objectives compare tiles), got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.threads >= 0, f"threads must be >= 0 (0 = torch's default), got {self.threads}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.bn_tiles >= 0, f"bn_tiles must be >= 0, got {self.bn_tiles}"),
            *number_checks(self),
        ]
        raise_problems(checks)
        return self


@dataclass
class BaselineConfig:
    """Everything a baseline run needs; every field is also a ``wsilocal baseline --field-name`` option."""

    # --- data
    cohort: str = ""  # cohort CSV (slide_id,path,label,split[,case_id]); slide files are not opened
    features: str = ""  # folder of <slide_id>.h5 tile features (`wsilocal features` or CLAM's extractor)
    out: str = ""  # run directory
    allow_outside_paths: bool = False  # allow cohort paths leading outside the CSV's folder
    # --- model
    method: str = BASELINE_METHOD
    model: str = ""  # a key of MIL_MODELS: maxpool meanpool abmil gabmil dsmil clam_sb clam_mb milrnn transmil
    # --- optimisation (CLAM's defaults, see the module docstring)
    epochs: int | None = None  # per training stage; none = the model's published count (else CLAM's 200)
    early_stopping: int = 20  # epochs without validation-loss improvement before stopping; 0 = never
    min_epochs: int = 50  # no early stop before this many epochs of a stage (CLAM's stop_epoch)
    optimizer: str | None = None  # adam, adamw, radam or sgd (lr and weight decay only); none = the model's own
    lr: float | None = None  # none = the model's default_optim
    weight_decay: float | None = None  # none = the model's default_optim
    plateau_patience: int = 0  # >0: lr ×plateau_factor after this many epochs without val-loss improvement
    plateau_factor: float = 0.1
    class_weights: bool = False  # scale each bag's loss by the inverse frequency of its class
    best_by: str = "balanced_accuracy"  # what picks checkpoint_best.pt: balanced_accuracy, loss or auroc
    max_instances: int = 0  # >0: train on a random subset of this many tiles of larger bags (memory, speed)
    # --- misc
    seed: int = 0
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    threads: int = 0  # torch CPU threads; 0 = torch's default

    def validate(self) -> BaselineConfig:
        """Check values that types alone do not; return self."""
        from wsilocal.models.mil import MIL_MODELS  # torch: loaded only when a baseline is configured
        from wsilocal.models.mil.base import OPTIMIZERS

        checks = [
            (bool(self.cohort), "cohort: a cohort CSV is required"),
            (bool(self.features), "features: a folder of tile features is required"),
            (bool(self.out), "out: a run directory is required"),
            (self.method == BASELINE_METHOD,
             f"method must be {BASELINE_METHOD!r} for a baseline run, got {self.method!r}"),
            (self.model in MIL_MODELS,
             f"model must be one of {', '.join(MIL_MODELS)}, got {self.model!r}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.early_stopping >= 0, f"early_stopping must be >= 0, got {self.early_stopping}"),
            (self.min_epochs >= 0, f"min_epochs must be >= 0, got {self.min_epochs}"),
            (self.optimizer is None or self.optimizer in OPTIMIZERS,
             f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.weight_decay is None or self.weight_decay >= 0,
             f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.plateau_patience >= 0, f"plateau_patience must be >= 0, got {self.plateau_patience}"),
            (0 < self.plateau_factor < 1, f"plateau_factor must be in (0, 1), got {self.plateau_factor}"),
            (self.max_instances >= 0, f"max_instances must be >= 0, got {self.max_instances}"),
            (self.threads >= 0, f"threads must be >= 0 (0 = torch's default), got {self.threads}"),
            *shared_checks(self),
        ]
        raise_problems(checks)
        return self


def _field_types(cls: type) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: typing.Any, annotation: typing.Any) -> typing.Any:
    """Check (and mildly coerce) one value against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"config: {name} must be a list, got {type(value).__name__} {_show(value)}")
        return [_coerce(name, v, item) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(f"config: {name} is too large a number") from None
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
    expected = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config: {name} must be {expected}, got {type(value).__name__} {_show(value)}")


def _show(value: typing.Any, limit: int = 80) -> str:
    """A short repr for an error message (huge values are cut, not printed whole)."""
    try:
        text = repr(value)
    except ValueError:  # an integer with more digits than Python converts to text
        return "(a huge number)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_from_dict(values: dict, cls: type = TrainConfig):
    """Build a config dataclass from a mapping; unknown keys or wrong types raise ConfigError."""
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping of keys to values, got {type(values).__name__}")
    types_ = _field_types(cls)
    unknown = sorted(str(k) for k in values if k not in types_)
    if unknown:
        raise ConfigError(f"config: unknown key(s) {', '.join(unknown)}")
    return cls(**{k: _coerce(k, v, types_[k]) for k, v in values.items()})


def load_config(path: str | Path, overrides: dict | None = None, cls: type = TrainConfig):
    """Read a YAML config file, apply overrides (already typed), validate."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config ({exc})") from None
    except RecursionError:  # yaml constructs nested lists recursively
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    try:
        config = config_from_dict({**values, **(overrides or {})}, cls).validate()
    except ConfigError as exc:  # name the file: the bad value is in it (or overrides it)
        raise ConfigError(f"{path}: {exc}") from None
    return config


def resolve_config(path: str | Path | None, overrides: dict | None = None,
                   cls: type = TrainConfig) -> TrainConfig | PretrainConfig | BaselineConfig:
    """A command's configuration, resolved once: the YAML file at ``path`` (None: no file) with ``overrides`` (the
    options given on the command line) over it, validated. A ConfigError from a file's value names the file."""
    if path is None:
        return config_from_dict(overrides or {}, cls).validate()
    return load_config(path, overrides, cls)


def save_config(config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))


def add_config_arguments(parser: argparse.ArgumentParser, cls: type = TrainConfig, skip: Collection[str] = ()) -> None:
    """Add ``--field-name`` options for every config field but those in ``skip`` (which a command defines itself);
    default: not given, so YAML values stay."""
    for f in fields(cls):
        if f.name in skip:
            continue
        annotation = _field_types(cls)[f.name]
        flag = "--" + f.name.replace("_", "-")
        base = annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            base = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif typing.get_origin(base) is list:
            parser.add_argument(flag, dest=f.name, type=int, nargs="+", default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=None)


def overrides_from_args(args: argparse.Namespace, cls: type = TrainConfig) -> dict:
    """The config fields given on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}


def parse_height_width(text: str) -> tuple[int, int]:
    """A size option's value, ``N`` (a square) or ``WIDTHxHEIGHT`` (as image sizes are written), as ``(height,
    width)`` (as arrays are indexed); an argparse ``type`` (ArgumentTypeError for a bad value or a side below 64)."""
    try:
        values = [int(v) for v in text.lower().split("x")]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 64:
        raise argparse.ArgumentTypeError(f"expected a side ≥ 64 or WIDTHxHEIGHT, got {text!r}")
    return (values[-1], values[0])
