"""Training and evaluating the tile-based MIL baselines of the paper's Table 1 on pre-extracted tile features.

``wsilocal baseline --model abmil --features FEATS --cohort cohort.csv --out RUN`` trains one model of
:data:`wsilocal.models.mil.MIL_MODELS` on bags read from ``FEATS/<slide_id>.h5`` (see :mod:`.bags`) and writes
the same run directory as the main method's trainer (:mod:`wsilocal.run.directory`), through the same epoch loop
(:mod:`.loop`). Its ``config.yaml`` has the optimizer, lr and weight decay filled in; its ``model.json`` says
method "baseline" and holds the model name, class names (index = position), in_dim and, when the feature files
record them, ``features``: how they were made (for ``predict``). ``checkpoint_best.pt`` is the epoch of the best
validation ``best_by`` (default balanced accuracy).

Defaults follow CLAM's training script (Lu et al., "Data-efficient and weakly supervised computational
pathology on whole-slide images", Nature Biomedical Engineering 2021; github.com/mahmoodlab/CLAM ``main.py``
and ``utils/core_utils.py``): one bag per optimizer step, early stopping on the validation loss after 20
epochs without improvement but never before epoch 50 (CLAM's ``EarlyStopping(patience=20, stop_epoch=50)``,
which its README commands switch on with ``--early_stopping``), no learning-rate schedule. The optimizer,
learning rate, weight decay and maximum epochs default to the model's own ``default_optim`` (each model file
cites where its values come from; CLAM's 200 epochs where a paper gives none); the config's ``optimizer``,
``lr``, ``weight_decay`` and ``epochs`` override them.

Models with several ``training_stages`` (MIL-RNN: the instance classifier, then the RNN on its top tiles)
run each stage in order with its own optimizer, for up to ``epochs`` epochs each; the best checkpoint is
chosen among the epochs of the last stage, whose model is the one that predicts.

Reproducibility: the initial weights come from ``seed``; bag order, dropout and instance sub-sampling of
each epoch from (seed, stage, epoch) alone; resume restores model, optimizer, scheduler and counters at an
epoch boundary, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsilocal.config import BASELINE_METHOD, BaselineConfig, save_config
from wsilocal.errors import WsilocalError
from wsilocal.features.extract import extraction_settings
from wsilocal.features.h5 import read_attrs
from wsilocal.models.mil import build_mil_model
from wsilocal.models.mil.base import OPTIMIZERS, MILModel
from wsilocal.run.directory import EvaluationFiles, RunDirectory, baseline_signature, expected_signature
from wsilocal.runtime import resolve_device
from wsilocal.slide.cohort import SPLITS, load_cohort
from wsilocal.train.bags import FeatureBags, load_bags
from wsilocal.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from wsilocal.train.data import Purpose, balanced_class_weights, epoch_order, sample_generator, stream_seed
from wsilocal.train.loop import (
    EpochLoop,
    TrainResult,
    Validation,
    load_resume_state,
    plateau_scheduler,
    refuse_existing_run,
    setup_logging,
    validation_row,
)
from wsilocal.train.metrics import classification_metrics, write_evaluation

log = logging.getLogger("wsilocal")

CLAM_EPOCHS = 200  # CLAM's --max_epochs, for models that publish no epoch count
# Drawing curves.png takes longer than an epoch on small cohorts: metrics files are rewritten at most this
# often, and always at the end of a stage (every epoch is in the log and in checkpoint_last.pt regardless).
METRICS_INTERVAL_S = 30.0


def _subsample(features: torch.Tensor, max_instances: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``max_instances`` random rows (in their original order); all rows when 0 or the bag is small."""
    if not max_instances or len(features) <= max_instances:
        return features
    keep = torch.randperm(len(features), generator=generator)[:max_instances].sort().values
    return features[keep]


@torch.no_grad()
def predict_bags(model: torch.nn.Module, bags: FeatureBags, device: torch.device, *, progress: bool = False,
                 desc: str = "validate", keep_attention: bool = False) -> dict:
    """Class probabilities of every bag, the mean bag cross-entropy and (optionally) per-tile attention.

    The loss is the plain cross-entropy of the bag logits (not a model's extra training terms), so validation
    losses compare across models.
    """
    model.eval()
    probabilities, losses, attention = [], [], []
    for index in tqdm(range(len(bags)), desc=desc, unit="slide", leave=False, disable=not progress):
        bag = bags.get(index)
        output = model(bag.features.to(device))
        losses.append(float(F.cross_entropy(output.logits, torch.tensor([bag.label], device=device))))
        probabilities.append(torch.softmax(output.logits, 1)[0].cpu().numpy())
        if keep_attention and output.attention is not None:
            attention.append((bag.slide_id, bag.coords, output.attention.detach().cpu().numpy().reshape(-1)))
    return {
        "probabilities": np.array(probabilities).reshape(len(bags), -1),
        "labels": np.array(bags.labels),
        "loss": float(np.mean(losses)) if losses else math.nan,
        "attention": attention,
    }


def _make_optimizer(config: BaselineConfig, model: MILModel) -> torch.optim.Optimizer:
    """The current stage's optimizer: the model's published one, with the config's overrides."""
    if config.optimizer is None:
        return model.make_optimizer(lr=config.lr, weight_decay=config.weight_decay)
    settings = model.optim_settings()
    params = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[config.optimizer](
        params, lr=config.lr if config.lr is not None else settings["lr"],
        weight_decay=config.weight_decay if config.weight_decay is not None else settings["weight_decay"])


def stage_epochs(config: BaselineConfig, model: MILModel, stage: str) -> int:
    """Epochs of one training stage: the config's, else the model's published count, else CLAM's 200."""
    return config.epochs or int(model.optim_settings(stage).get("epochs", CLAM_EPOCHS))


def _describe(model: MILModel, in_dim: int, config: BaselineConfig) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    stages = []
    for stage in model.training_stages:
        settings = model.optim_settings(stage)
        stages.append(f"{stage}: {config.optimizer or settings['optimizer']} lr "
                      f"{config.lr if config.lr is not None else settings['lr']:g} weight decay "
                      f"{config.weight_decay if config.weight_decay is not None else settings['weight_decay']:g}, "
                      f"up to {stage_epochs(config, model, stage)} epochs")
    return f"{config.model}: {n_params:,} parameters on {in_dim}-d tile features; {'; '.join(stages)}"


class BaselineTrainer:
    """Trains one baseline run directory from a :class:`BaselineConfig`; ``run()`` does everything.

    It sets the run up (cohort, feature bags, model, resume) and runs a :class:`~wsilocal.train.loop.EpochLoop`, to
    which it is the :class:`~wsilocal.train.loop.Phases`: the model's training stages, one pass over the bags,
    validation.
    """

    checkpoint_key = "stage"  # checkpoint_last.pt's "stage", "stage_best" (see Phases)

    def __init__(self, config: BaselineConfig, progress: bool = True, resume: bool = False):
        self.config = config.validate()
        self.progress = progress
        self.resume = resume
        self.directory = RunDirectory(config.out)
        self.warnings: list[str] = []

    def run(self) -> TrainResult:
        config, run = self.config, self.directory
        refuse_existing_run(run, self.resume)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        if self.resume and not run.metadata_file.is_file():
            raise WsilocalError(f"{run.path}: cannot resume, no {run.metadata_file.name} in it")
        saved = run.metadata() if self.resume else {}
        cohort = load_cohort(config.cohort, classes=saved.get("classes"), check_files=False,
                             allow_outside=config.allow_outside_paths)
        classes = list(cohort.classes)
        train = load_bags(cohort, "train", config.features, in_dim=saved.get("in_dim"))
        if not len(train):
            raise WsilocalError(f"{config.features}: no training slide has usable features "
                                f"({_first_reason(train.skipped)})")
        val = load_bags(cohort, "val", config.features, in_dim=train.in_dim)
        if not len(val):
            raise WsilocalError(f"{config.features}: no validation slide (split 'val') has usable features "
                                f"({_first_reason(val.skipped)})")
        skipped = {**train.skipped, **val.skipped}
        torch.manual_seed(config.seed)  # the initial weights of the model are part of the run's seed
        model = build_mil_model(config.model, len(classes), in_dim=train.in_dim).to(self.device)
        signature = baseline_signature(config.model, classes, train.in_dim)

        # Everything above may fail on bad input; only now does the run directory get written.
        setup_logging(run)
        state = None
        if self.resume:
            state = load_resume_state(run, model, signature)
            self.warnings = state.get("warnings", [])
        else:
            save_config(config, run.config_file)
            meta = {"method": BASELINE_METHOD, "model": config.model, "classes": classes, "in_dim": train.in_dim}
            settings, problem = _feature_settings([*train.paths, *val.paths])
            if settings is not None:
                meta["features"] = settings  # so `wsilocal predict` makes the same features from slide files
            elif problem:
                self.warnings.append(problem)
                log.warning("%s", problem)
            run.write_metadata(meta)
            for slide_id, reason in skipped.items():
                self.warnings.append(f"skipped {slide_id}: {reason}")
                log.warning("skipped %s: %s", slide_id, reason)
        log.info("model: %s", _describe(model, train.in_dim, config))
        log.info("train %d slides, validation %d slides, classes %s", len(train), len(val), classes)

        self.model, self.train_bags, self.val_bags = model, train, val
        self.classes, self.in_dim, self.signature = classes, train.in_dim, signature
        self.stages = list(model.training_stages)
        self.n_phases = len(self.stages)
        self.stage_index = 0
        self.class_weight = (balanced_class_weights(train.labels, len(classes), self.device) if config.class_weights
                             else None)
        loop = EpochLoop(run, self, best_by=config.best_by, early_stopping=config.early_stopping,
                         min_epochs=config.min_epochs, metrics_interval=METRICS_INTERVAL_S, warnings=self.warnings,
                         resume_hint=f"wsilocal baseline --resume --out {run.path}", progress=self.progress)
        best, history = loop.run(state)
        return loop.finish(best, history, skipped, _describe(model, train.in_dim, config))

    # --- the phases of the epoch loop (:class:`~wsilocal.train.loop.Phases`): the model's training stages ---
    def phase_label(self, p: int) -> str:
        return f"stage {self.stages[p]}"

    def phase_epochs(self, p: int) -> int:
        return stage_epochs(self.config, self.model, self.stages[p])

    def start_phase(self, p: int, resumed: bool) -> tuple[torch.optim.Optimizer, object | None]:
        """The stage's optimizer (the model's published one, with the config's overrides); a plateau schedule only
        with ``plateau_patience``."""
        config = self.config
        self.stage_index = p
        self.model.set_stage(self.stages[p])
        optimizer = _make_optimizer(config, self.model)
        scheduler = (plateau_scheduler(optimizer, config.plateau_factor, config.plateau_patience)
                     if config.plateau_patience else None)
        return optimizer, scheduler

    def train_epoch(self, p: int, epoch: int, optimizer: torch.optim.Optimizer, mid_epoch: dict | None) -> dict:
        return self._train_epoch(self.model, self.train_bags, p, self.stages[p], epoch, optimizer, self.class_weight,
                                 self.classes)

    def validate(self, p: int) -> Validation:
        evaluation = predict_bags(self.model, self.val_bags, self.device, progress=self.progress)
        metrics = classification_metrics(evaluation["probabilities"], evaluation["labels"], self.classes)
        return Validation(evaluation["loss"], metrics, validation_row(evaluation["loss"], metrics))

    def scored(self, p: int, score: tuple, epoch_index: int) -> None:
        """Nothing: only the best epoch of the last stage counts, which the loop keeps."""

    def end_phase(self, p: int, history: list[dict]) -> None:
        """Nothing: the next stage starts from the weights this one ends with."""

    def epoch_done(self, history: list[dict]) -> None:
        """Nothing to add."""

    def resumable(self, mid_epoch: dict | None) -> dict:
        """No fields beside the loop's: an epoch is never stopped halfway."""
        return {}

    def save_checkpoint(self, path: Path, extra: dict) -> None:
        """The model, with the stage it is in (``checkpoint_best.pt``: the stage that predicts) and ``extra``."""
        save_checkpoint({
            "model": self.model.state_dict(), "signature": self.signature, "classes": self.classes,
            "in_dim": self.in_dim, "config": asdict(self.config), **(extra or {"stage": self.stage_index}),
        }, path)

    # --- one epoch ------------------------------------------------------------------------------------
    def _train_epoch(self, model, train: FeatureBags, stage_no: int, stage: str, epoch: int, optimizer,
                     class_weight: torch.Tensor | None, classes: list[str]) -> dict:
        """One pass over the training bags, one optimizer step per bag (as CLAM)."""
        config = self.config
        stream = epoch + 1000 * stage_no  # the (stage, epoch) pair every random draw of this epoch derives from
        torch.manual_seed(stream_seed(config.seed, Purpose.DROPOUT, stream))  # dropout, models' own sampling
        model.train()
        order = epoch_order(len(train), config.seed, stream)
        start = time.perf_counter()
        losses, probabilities = [], np.zeros((len(train), len(classes)))
        bar = tqdm(order, desc=f"{stage} epoch {epoch}", unit="slide", leave=False, disable=not self.progress)
        for index in bar:
            bag = train.get(index)
            features = _subsample(bag.features, config.max_instances,
                                  sample_generator(config.seed, Purpose.SUBSAMPLE, stream, index)).to(self.device)
            label = torch.tensor([bag.label], device=self.device)
            output = model(features)
            loss = model.loss(output, label, features)
            if class_weight is not None:
                loss = loss * class_weight[bag.label]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            probabilities[index] = torch.softmax(output.logits.detach(), 1)[0].cpu().numpy()
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        metrics = classification_metrics(probabilities, np.array(train.labels), classes)
        return {
            "phase": stage_no, "stage": stage, "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "train_accuracy": metrics["accuracy"],
            "train_balanced_accuracy": metrics["balanced_accuracy"],
            "seconds": time.perf_counter() - start,
        }


def _feature_settings(paths: list[Path]) -> tuple[dict | None, str | None]:
    """(the extraction settings all these feature files share, None) — or (None, why there are none to record).

    Files without settings (made by CLAM or by hand) give (None, None): nothing to warn about, but such a run
    cannot predict from slide files.
    """
    found: dict[str, tuple[dict, Path]] = {}
    for path in paths:
        settings = extraction_settings(read_attrs(path))
        if settings is None:
            return None, None
        found.setdefault(json.dumps(settings, sort_keys=True), (settings, path))
    if len(found) == 1:
        return next(iter(found.values()))[0], None
    (first, first_path), (second, second_path) = list(found.values())[:2]
    differing = ", ".join(key for key in first if first[key] != second[key])
    return None, (f"the feature files were made with different {differing} (e.g. {first_path.name} and "
                  f"{second_path.name}): the model learns from them all, but `wsilocal predict` cannot reproduce "
                  "mixed features for this run")


def _first_reason(skipped: dict[str, str]) -> str:
    if not skipped:
        return "the split is empty"
    slide_id, reason = next(iter(skipped.items()))
    more = f"; {len(skipped) - 1} more skipped" if len(skipped) > 1 else ""
    return f"{slide_id}: {reason}{more}"


def train_baseline(config: BaselineConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train a MIL baseline from a configuration (see :class:`BaselineTrainer`)."""
    return BaselineTrainer(config, progress=progress, resume=resume).run()


def load_baseline_run(run_dir: str | Path, checkpoint: str = "best") -> tuple[BaselineConfig, torch.nn.Module, dict]:
    """The config, the model with the chosen checkpoint's weights (in its predicting stage), and the checkpoint."""
    run = RunDirectory(run_dir)
    config = run.config()
    meta = run.metadata()
    path = run.checkpoint_path(checkpoint)  # interrupted before the last stage: only `last` exists
    state = load_checkpoint(path, expected_signature=expected_signature(config, meta))
    model = build_mil_model(config.model, len(meta["classes"]), in_dim=meta["in_dim"])
    load_model_state(model, state, path)
    model.set_stage(model.training_stages[state.get("stage", len(model.training_stages) - 1)])
    model.eval()
    return config, model, state


def evaluate_baseline_run(run_dir: str | Path, split: str = "test", *, checkpoint: str = "best",
                          progress: bool = True, cohort: str | Path | None = None,
                          features: str | Path | None = None, files: EvaluationFiles | None = None) -> dict:
    """Evaluate a baseline run on one split; the same files as the main method's ``evaluate_run`` plus attention.

    Writes ``metrics_<split>.json``, ``predictions_<split>.csv``, ``roc_<split>.png`` and, for models with
    tile attention, ``attention_<split>/<slide_id>.csv`` (level-0 x, y of each tile and its attention) for
    heatmaps, into ``files`` (default: the run's own); returns the metrics. Another ``cohort`` (an external test
    set) is read from its own ``features`` folder, which must have been made as the run's features were.
    """
    if split not in SPLITS:
        raise WsilocalError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    run = RunDirectory(run_dir)
    config, model, state = load_baseline_run(run.path, checkpoint)
    classes = list(state["classes"])
    if cohort is not None and features is None:
        raise WsilocalError(f"{cohort}: a baseline run evaluated on another cohort needs that cohort's tile features "
                            f"(--features DIR, made by `wsilocal features` with the weights of {run.path}'s features)")
    cohort_csv, features_dir = (config.cohort, config.features) if cohort is None else (cohort, features)
    loaded = load_cohort(cohort_csv, classes=classes, check_files=False, allow_outside=config.allow_outside_paths)
    if not loaded.split(split):
        raise WsilocalError(f"{cohort_csv}: split {split!r} has no slides")
    bags = load_bags(loaded, split, features_dir, in_dim=state["in_dim"])
    if not len(bags):
        raise WsilocalError(f"{features_dir}: no slide of split {split!r} has usable features "
                            f"({_first_reason(bags.skipped)})")
    if cohort is not None:
        _check_same_extraction(run, bags.paths, features_dir)
    device = resolve_device(config.device)
    evaluation = predict_bags(model.to(device), bags, device, progress=progress, desc=f"evaluate {split}",
                              keep_attention=True)
    metrics = classification_metrics(evaluation["probabilities"], evaluation["labels"], classes)
    metrics.update(loss=evaluation["loss"], split=split, checkpoint=checkpoint, cohort=str(cohort_csv),
                   skipped=bags.skipped)
    files = files or run.evaluation_files(split)
    write_evaluation(files, metrics, list(bags.slide_ids), list(bags.labels), evaluation["probabilities"], classes)
    if evaluation["attention"]:
        files.attention.mkdir(exist_ok=True)
        for slide_id, coords, attention in evaluation["attention"]:
            write_attention_csv(files.attention / f"{slide_id}.csv", coords, attention)
    return metrics


def recorded_feature_settings(run: RunDirectory) -> dict | None:
    """How a baseline run's tile features were made (:data:`~wsilocal.features.extract.EXTRACTION_SETTINGS`): from
    ``model.json`` (``features``), else — a run trained before it was recorded there — from the first feature file
    in the run's ``features`` folder that records them; None where neither does (features made by CLAM)."""
    meta = run.metadata()
    if isinstance(meta.get("features"), dict):
        return meta["features"]
    for path in sorted(Path(run.config().features).glob("*.h5")):
        try:
            settings = extraction_settings(read_attrs(path))
        except WsilocalError:
            continue
        if settings is not None:
            return settings
    return None


def _check_same_extraction(run: RunDirectory, paths: Sequence[Path], features_dir: str | Path) -> None:
    """Refuse features of another cohort made otherwise than the run's (other weights, tile size, MPP...): the
    model would be scored on inputs it never learnt from."""
    wanted = recorded_feature_settings(run)
    if wanted is None:
        raise WsilocalError(f"{run.metadata_file}: the run does not record how its tile features were made, and no "
                            f"feature file in {run.config().features} does; they cannot be checked against "
                            f"{features_dir}")
    found, problem = _feature_settings(list(paths))
    if problem:
        raise WsilocalError(f"{features_dir}: {problem}")
    if found is None:
        raise WsilocalError(f"{features_dir}: the feature files do not record how they were made; make them with "
                            "`wsilocal features`")
    differing = [key for key in wanted if key != "assume_mpp" and found.get(key) != wanted[key]]
    if differing:
        key = differing[0]
        raise WsilocalError(f"{features_dir}: made with other {', '.join(differing)} than {run.path}'s features "
                            f"({key} {found.get(key)!r}, the run's {wanted[key]!r})")


def write_attention_csv(path: str | Path, coords: np.ndarray, attention: np.ndarray) -> None:
    """One row per tile: level-0 x, y of its top-left corner and its attention score."""
    if len(coords) != len(attention):
        raise WsilocalError(f"{path}: {len(coords)} tile coordinates but {len(attention)} attention values")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["x", "y", "attention"])
        for (x, y), a in zip(coords.tolist(), attention.tolist(), strict=True):
            writer.writerow([int(x), int(y), f"{a:.6g}"])
