"""``wsilocal evaluate RUN --split test``: metrics, predictions CSV and ROC curves of a trained run."""

from __future__ import annotations

from pathlib import Path

import torch

from wsilocal.config import TrainConfig
from wsilocal.errors import WsilocalError
from wsilocal.prepare.cache import prepare_slides, settings_for
from wsilocal.run.directory import EvaluationFiles, RunDirectory, expected_signature, masks_glass
from wsilocal.runtime import memory_budget_bytes, resolve_device
from wsilocal.slide.cohort import SPLITS, load_cohort
from wsilocal.train.baseline import evaluate_baseline_run
from wsilocal.train.checkpoint import load_checkpoint, load_model_state
from wsilocal.train.data import CachedSlides
from wsilocal.train.metrics import classification_metrics, write_evaluation
from wsilocal.train.trainer import build_model, evaluate_samples


def load_run(run_dir: str | Path, checkpoint: str = "best") -> tuple[TrainConfig, torch.nn.Module, dict]:
    """The config, the model with the chosen checkpoint's weights, and the checkpoint's metadata."""
    run = RunDirectory(run_dir)
    config = run.config()
    path = run.checkpoint_path(checkpoint)
    meta = run.metadata()
    state = load_checkpoint(path, expected_signature=expected_signature(config, meta))
    net = build_model(config, len(meta["classes"]), meta["block_boundaries"])
    load_model_state(net, state, path)
    net.eval()
    return config, net, state


def evaluate_run(run_dir: str | Path, split: str = "test", *, checkpoint: str = "best",
                 progress: bool = True, strict: bool = False, cohort: str | Path | None = None,
                 out: str | Path | None = None, cache: str | Path | None = None,
                 features: str | Path | None = None) -> dict:
    """Evaluate a run on one split of its cohort — or of another cohort, an external test set — and write the
    metrics, per-slide predictions and ROC curves.

    Writes ``metrics_<split>.json`` (accuracy, balanced_accuracy, auroc, per-class figures, confusion matrix,
    skipped slides, the cohort evaluated), ``predictions_<split>.csv`` and ``roc_<split>.png`` into the run, or
    into ``out`` for another ``cohort`` (the run's own files stay those of its cohort); returns the metrics. A
    slide whose file is missing or unreadable is skipped and listed in ``metrics["skipped"]``; ``strict`` refuses
    the cohort instead, before any work, when a file is missing (:class:`~wsilocal.errors.CohortError` listing
    every problem).

    Another cohort is read with the run's settings (MPP, normalisation, tissue detection) into ``cache`` (default
    ``out/cache``); a baseline run needs that cohort's tile ``features``, made by ``wsilocal features`` with the
    extraction settings and weights of the run's own features (checked).
    """
    if split not in SPLITS:
        raise WsilocalError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    run = RunDirectory(run_dir)
    if not run.config_file.is_file():
        raise WsilocalError(f"{run.path}: not a run directory (no {run.config_file.name})")
    if cohort is not None and out is None:
        raise WsilocalError(f"{cohort}: evaluating another cohort needs an output folder (--out): the run's own "
                            "metrics and predictions stay those of its cohort")
    files = run.evaluation_files(split) if cohort is None else EvaluationFiles(Path(out), split)
    if run.is_baseline:  # a tile-feature MIL baseline (`wsilocal baseline`) evaluates on its bags
        return evaluate_baseline_run(run.path, split, checkpoint=checkpoint, progress=progress, cohort=cohort,
                                     features=features, files=files)
    if features is not None:
        raise WsilocalError(f"{run.path}: --features is for baseline runs; this run reads the slides themselves")
    config, net, state = load_run(run.path, checkpoint)
    classes = list(state["classes"])
    cohort_csv = config.cohort if cohort is None else cohort
    loaded = load_cohort(cohort_csv, classes=classes, check_files=strict, allow_outside=config.allow_outside_paths)
    slides = loaded.split(split)
    if not slides:
        raise WsilocalError(f"{cohort_csv}: split {split!r} has no slides")
    cache_dir = config.resolved_cache() if cohort is None else Path(cache or Path(out) / "cache")
    prepared = prepare_slides(slides, cache_dir, settings_for(config), workers=config.workers, progress=progress)
    kept = [s for s in slides if s.slide_id in prepared.entries]
    if not kept:
        raise WsilocalError(f"{cohort_csv}: no slide of split {split!r} could be read")
    device = resolve_device(config.device)
    labels = [loaded.label_index(s) for s in kept]
    samples = CachedSlides([prepared.entries[s.slide_id] for s in kept], labels, state["mean"], state["std"],
                           mask_glass=masks_glass(run.metadata()))
    # Slides whose whole forward would not fit are evaluated streamed, with the run's streaming settings.
    evaluation = evaluate_samples(net.to(device), samples, device, progress=progress, desc=f"evaluate {split}",
                                  memory_budget=memory_budget_bytes(config.memory_budget_gb, device),
                                  stream_tile=config.stream_tile, stream_store=config.stream_store)
    metrics = classification_metrics(evaluation["probabilities"], evaluation["labels"], classes)
    metrics.update(loss=evaluation["loss"], split=split, checkpoint=checkpoint, cohort=str(cohort_csv),
                   skipped=prepared.skipped)
    write_evaluation(files, metrics, [s.slide_id for s in kept], labels, evaluation["probabilities"], classes)
    return metrics


def format_metrics(metrics: dict) -> str:
    """A short results table for the terminal."""
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [
        f"split {metrics['split']}: {metrics['n']} slides",
        f"  accuracy           {fmt(metrics['accuracy'])}",
        f"  balanced accuracy  {fmt(metrics['balanced_accuracy'])}",
        f"  AUROC              {fmt(metrics['auroc'])}",
        f"  {'class':<16}{'precision':>10}{'recall':>8}{'AUROC':>8}{'n':>5}",
    ]
    for name, row in metrics["per_class"].items():
        lines.append(f"  {name:<16}{fmt(row['precision']):>10}{fmt(row['recall']):>8}{fmt(row['auroc']):>8}"
                     f"{row['support']:>5}")
    for slide_id, reason in metrics.get("skipped", {}).items():
        lines.append(f"  skipped {slide_id}: {reason}")
    return "\n".join(lines)
