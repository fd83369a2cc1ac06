"""``wsilocal demo``: the whole pipeline on a synthetic cohort, in one command, ending in one picture.

synthetic slides → prepare (5x cache) → ``wsilocal pretrain`` (self-supervised, on the unlabeled train and val
slides) → ``wsilocal train`` K=4 with RFR from those weights → ``wsilocal evaluate`` on the test split →
``wsilocal predict --heatmap`` straight from the test slide files → ``summary.png``: test slides with the lesion
the generator drew beside the model's attention, the ROC curve, the training curves and the pretraining loss.

No pretrained weights can be downloaded here, so the demo makes its own with a short pretraining, as a user
without ImageNet weights would (docs/pretraining.md), and fine-tunes them at the paper's trunk rate. The
from-scratch rates and schedule of :class:`DemoSettings` stay what the accuracy benchmark's random-weight rows
train with (:func:`demo_config` is shared with ``wsilocal bench accuracy``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from wsilocal.config import PretrainConfig, TrainConfig
from wsilocal.errors import WsilocalError


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo cohort, pretraining and training; the defaults aim at 15 minutes on 2 CPU cores.

    The fields from ``accumulation`` to ``best_by`` (with ``lr_trunk`` for random weights) are also the accuracy
    benchmark's optimiser settings; the demo itself fine-tunes its pretrained trunk at ``TrainConfig.lr_trunk``.
    """

    classes: int = 3
    slides_per_class: int = 20
    size: tuple[int, int] = (4096, 4096)  # level 0 at 0.25 µm/px → about 512² px at 5x
    seed: int = 0
    # Epochs from the pretrained weights (the accuracy benchmark sets its own): from 180 pretraining steps the demo
    # cohort reaches its best validation result within about 120 optimizer steps; 6 epochs of 36 slides give 216.
    epochs: int = 6
    accumulation: int = 1  # from random weights the number of optimizer steps matters more than their noise
    lr_trunk: float = 1e-4  # higher rates make a random trunk with frozen BatchNorm diverge
    lr_aux: float = 1e-3
    workers: int = 2
    # The demo's slides are ~30× smaller than real 5x slides: 10 RFR patches of 128² px would cover about the
    # whole slide and cost 5× the trunk's compute. 3 patches keep RFR's share of a step near the paper's.
    rfr_patches: int = 3
    # The demo learns from ~40 slides in minutes, so its cohort is easier than the generator's full-difficulty
    # defaults (on which a ResNet34 from scratch stays at chance): the lesion is still a minority of the tissue but
    # larger (20–45 %), without look-alike distractors, with half the stain variation. The accuracy benchmark
    # (`wsilocal bench accuracy`) uses the full-difficulty cohorts.
    lesion_fraction: tuple[float, float] = (0.2, 0.45)
    distractors: float = 0.0
    stain_variation: float = 0.5
    # A 10-slide validation split is noisy: a plateau schedule cuts the rate on noise and stalls learning, so the
    # demo keeps its rates for all epochs.
    plateau_patience: int = 1000
    # Frozen BatchNorm statistics measured once stop normalising as the trunk's weights move, and learning can
    # collapse to chance; re-measuring them after every epoch keeps it learning.
    recalibrate_bn: bool = True
    # Batch 1 at a constant rate leaves the final classifier's decision noisy from epoch to epoch, and a 10-slide
    # validation split picks a lucky early epoch by balanced accuracy: rates fall along a cosine, and the epoch of
    # lowest validation loss is kept.
    lr_schedule: str = "cosine"
    best_by: str = "loss"
    # --- self-supervised pretraining on the unlabeled train and val slides (`wsilocal pretrain`, VICReg), whose
    # weights the training starts from. 96-px tiles at 5x with 64-px views, 64 tiles a step, as the accuracy
    # benchmark's pretraining; on 2 CPU cores a step takes ~2 s, so ~6 min. (Measured on a 210-slide cohort, 600 such
    # steps lifted a linear probe of tile class from 0.57 to 0.96 balanced accuracy.)
    pretrain_steps: int = 180
    pretrain_batch_size: int = 64
    pretrain_tile: int = 96
    pretrain_crop: int = 64
    pretrain_warmup_steps: int = 20  # the default 100 would leave a 180-step run little time at its peak rate
    pretrain_bn_tiles: int = 512  # un-augmented tiles re-estimating the BatchNorm statistics at the end
    # --- the picture: this many test slides of each class (the first by slide id, right or wrong)
    heatmaps_per_class: int = 2


QUICK = DemoSettings(slides_per_class=4, size=(2048, 2048), epochs=1, accumulation=2, pretrain_steps=4,
                     pretrain_batch_size=8, pretrain_tile=64, pretrain_crop=48, pretrain_warmup_steps=1,
                     pretrain_bn_tiles=16)


def demo_config(out: Path, settings: DemoSettings) -> TrainConfig:
    """The demo's training configuration from random weights (the accuracy benchmark's base configuration);
    :func:`pretrained_config` is the one the demo runs."""
    return TrainConfig(
        cohort=str(out / "cohort" / "cohort.csv"),
        out=str(out / "run"),
        cache=str(out / "cache"),
        k=4,
        epochs=settings.epochs,
        accumulation=settings.accumulation,
        lr_trunk=settings.lr_trunk,
        lr_aux=settings.lr_aux,
        rfr_patches=settings.rfr_patches,
        plateau_patience=settings.plateau_patience,
        recalibrate_bn=settings.recalibrate_bn,
        lr_schedule=settings.lr_schedule,
        best_by=settings.best_by,
        early_stopping=0,
        seed=settings.seed,
        workers=settings.workers,
    )


def pretrain_config(out: Path, settings: DemoSettings, mpp: float) -> PretrainConfig:
    """The demo's pretraining: its cohort's train and val slides (labels never read, no test slide), at ``mpp``."""
    return PretrainConfig(cohort=str(out / "cohort" / "cohort.csv"), out=str(out / "pretrained"), mpp=mpp,
                          tile=settings.pretrain_tile, crop=settings.pretrain_crop, steps=settings.pretrain_steps,
                          batch_size=settings.pretrain_batch_size, warmup_steps=settings.pretrain_warmup_steps,
                          bn_tiles=settings.pretrain_bn_tiles, seed=settings.seed, workers=settings.workers)


def pretrained_config(out: Path, settings: DemoSettings, weights: str | Path) -> TrainConfig:
    """The training the demo runs: :func:`demo_config` from the pretraining's ``weights`` at the paper's trunk
    rate (as ``wsilocal bench accuracy`` fine-tunes pretrained weights). With weights the input is normalised with
    ImageNet's mean/std and the frozen BatchNorm statistics are the weights' own: the trainer never recalibrates
    them, so ``recalibrate_bn`` is off, as the run's ``config.yaml`` then says."""
    return replace(demo_config(out, settings), weights=str(weights), lr_trunk=TrainConfig.lr_trunk,
                   recalibrate_bn=False)


def command_line(command: str, config) -> str:
    """The ``wsilocal`` command line giving ``config``: ``--flag value`` for every field that differs from the
    config class's default (what ``add_config_arguments`` parses)."""
    parts = ["wsilocal", command]
    for f in dataclasses.fields(config):
        value, default = getattr(config, f.name), getattr(type(config)(), f.name)
        if value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return " ".join(parts)


def _check_cohort(folder: Path, settings: DemoSettings, params) -> None:
    """Refuse a cohort folder that an earlier demo wrote with other sizes (e.g. ``--quick``'s): it would be reused."""
    try:
        meta = json.loads((folder / "synth.json").read_text())
        saved = (meta["slides_per_class"], len(meta["classes"]), list(meta["params"]["size"]), meta["params"]["seed"],
                 list(meta["params"]["lesion_fraction"]), meta["params"]["distractors"],
                 meta["params"]["stain_variation"])
    except (OSError, ValueError, KeyError, TypeError):
        saved = None
    wanted = (settings.slides_per_class, settings.classes, list(settings.size), settings.seed,
              list(params.lesion_fraction), params.distractors, params.stain_variation)
    if saved != wanted:
        raise WsilocalError(f"{folder}: holds a cohort other than this demo's (an earlier `wsilocal demo --quick`, or "
                            f"another version?); delete {folder.parent} or give the demo another --out")


def _same_run(run_dir: Path, config: TrainConfig) -> bool:
    """Whether ``run_dir`` holds no run yet, or one started with exactly ``config`` (so it may be continued)."""
    import yaml

    saved = run_dir / "config.yaml"
    if not (run_dir / "checkpoint_last.pt").exists():
        return True
    values = yaml.safe_load(saved.read_text()) if saved.is_file() else None
    return values == json.loads(json.dumps(dataclasses.asdict(config)))


def _summary_slides(out: Path, predictions_dir: Path, classes: list[str], per_class: int, done: set[str]):
    """The heatmaps of the summary: the first ``per_class`` test slides of each class by slide id, with masks."""
    from wsilocal.infer.summary import load_heatmap

    synth = json.loads((out / "cohort" / "synth.json").read_text())
    with open(out / "cohort" / "cohort.csv", newline="") as handle:
        test = sorted((r for r in csv.DictReader(handle) if r["split"] == "test" and r["slide_id"] in done),
                      key=lambda r: r["slide_id"])
    chosen = [r for c in classes for r in [r for r in test if r["label"] == c][:per_class]]
    all_test = []
    for row in test:
        info = synth["slides"][row["slide_id"]]
        all_test.append(load_heatmap(predictions_dir, row["slide_id"], label=row["label"],
                                     mask_path=out / "cohort" / info["mask"], mask_downsample=info["mask_downsample"]))
    by_id = {h.slide_id: h for h in all_test}
    return [by_id[r["slide_id"]] for r in chosen], all_test


def _predictions_agree(evaluated_csv: Path, predicted_csv: Path) -> float | None:
    """The largest difference between the probabilities ``evaluate`` computed on the cached images and those
    ``predict`` computed from the slide files (None when they share no slide)."""
    def read(path: Path) -> dict[str, list[float]]:
        with open(path, newline="") as handle:
            return {r["slide_id"]: [float(v) for k, v in r.items() if k.startswith("p_")]
                    for r in csv.DictReader(handle)}

    evaluated, predicted = read(evaluated_csv), read(predicted_csv)
    common = evaluated.keys() & predicted.keys()
    if not common:
        return None
    return max(abs(a - b) for s in common for a, b in zip(evaluated[s], predicted[s], strict=True))


def run_demo(out: Path, quick: bool = False, settings: DemoSettings | None = None) -> dict:
    """Run the demo into ``out``; print what it did; return what ``demo_result.json`` holds.

    Each step reuses what an earlier run of the demo in ``out`` finished (the cohort, the cache, a finished
    pretraining, a run with the same settings, which it continues); a run started with other settings is refused.
    """
    from wsilocal.infer.load import load_predictor
    from wsilocal.infer.predict import cohort_slides, format_run, predict_slides
    from wsilocal.infer.summary import write_summary
    from wsilocal.prepare.cache import PrepareSettings, format_summary, prepare_cohort
    from wsilocal.pretrain.trainer import CHECKPOINT_FILE, pretrain
    from wsilocal.slide.cohort import load_cohort
    from wsilocal.synth import SynthParams, synthesize_cohort
    from wsilocal.train.evaluate import evaluate_run, format_metrics
    from wsilocal.train.trainer import train

    settings = settings or (QUICK if quick else DemoSettings())
    out = Path(out)
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    clock = [started]

    def stage_done(name: str) -> None:
        now = time.perf_counter()
        stage_seconds[name] = round(now - clock[0], 1)
        clock[0] = now

    print(f"[1/6] synthetic cohort: {settings.classes} classes × {settings.slides_per_class} slides, "
          f"level 0 ≈ {settings.size[0]}×{settings.size[1]} px at 0.25 µm/px, lesion outlines in masks/ → "
          f"{out / 'cohort'}")
    csv_path = out / "cohort" / "cohort.csv"
    params = SynthParams(lesion_fraction=settings.lesion_fraction, distractors=settings.distractors,
                         stain_variation=settings.stain_variation)
    if csv_path.exists():
        _check_cohort(out / "cohort", settings, params)
    else:
        synthesize_cohort(out / "cohort", classes=settings.classes, slides_per_class=settings.slides_per_class,
                          size=settings.size, seed=settings.seed, workers=settings.workers, params=params)
    stage_done("cohort")
    base = demo_config(out, settings)
    print(f"[2/6] prepare: tissue boxes at {base.mpp} µm/px (5x) → {base.cache}")
    cohort = load_cohort(csv_path)
    result, _ = prepare_cohort(cohort, base.cache, PrepareSettings(mpp=base.mpp), workers=settings.workers)
    print(format_summary(cohort, result))
    stage_done("prepare")

    pre = pretrain_config(out, settings, base.mpp)
    print(f"[3/6] pretrain: self-supervised ({pre.objective}) on the unlabeled train and val slides, {pre.steps} "
          f"steps of {pre.batch_size} tiles ({pre.tile} px at {pre.mpp} µm/px) → {pre.out}")
    pretrained = pretrain(pre, resume=(Path(pre.out) / CHECKPOINT_FILE).exists())
    s = pretrained.summary
    print(f"pretrained {s['steps']} steps on {s['tiles_seen']} tiles of {s['slides']} slides, loss "
          f"{s['first_loss']:.3f} → {s['final_loss']:.3f}; weights {pretrained.weights}")
    stage_done("pretrain")

    config = pretrained_config(out, settings, pretrained.weights)
    run_dir = Path(config.out)
    if not _same_run(run_dir, config):
        raise WsilocalError(f"{run_dir}: holds a run with other settings (an earlier version of the demo?); delete "
                            f"{run_dir} or give the demo another --out")
    resume = (run_dir / "checkpoint_last.pt").exists()
    print(f"[4/6] train: ResNet34 in K={config.k} locally supervised modules with RFR from the pretrained weights, "
          f"{config.epochs} epochs{' (continuing)' if resume else ''} → {run_dir}")
    train(config, resume=resume)
    stage_done("train")

    print("[5/6] evaluate on the test split (the cached 5x images)")
    metrics = evaluate_run(run_dir, "test")
    print(format_metrics(metrics))
    stage_done("evaluate")

    predictions_dir = out / "predictions"
    print(f"[6/6] predict with heatmaps straight from the test slide files → {predictions_dir}")
    predictor = load_predictor(run_dir)
    predicted = predict_slides(predictor, cohort_slides(csv_path, predictor.classes, "test"), predictions_dir,
                               heatmap=True)
    print(format_run(predicted))
    difference = _predictions_agree(run_dir / "predictions_test.csv", predicted.predictions_csv)
    if difference is not None:
        print(f"largest difference between these probabilities and the evaluation's: {difference:.1e}")
    stage_done("predict")

    shown, every = _summary_slides(out, predictions_dir, list(predictor.classes), settings.heatmaps_per_class,
                                   set(predicted.predictions))
    shares = {h.slide_id: h.shares() for h in every}
    summary_png = write_summary(
        out / "summary.png", shown, predictions_csv=run_dir / "predictions_test.csv",
        history=json.loads((run_dir / "metrics.json").read_text()),
        pretrain_log=Path(pre.out) / "pretrain_log.csv",
        title=f"wsilocal demo: K={config.k} from {pre.steps} pretraining steps, {config.epochs} epochs; test "
              f"balanced accuracy {_fmt(metrics['balanced_accuracy'])}, AUROC {_fmt(metrics['auroc'])} "
              f"({metrics['n']} slides)")
    stage_done("summary")
    minutes = (time.perf_counter() - started) / 60
    mean = {k: sum(v[k] for v in shares.values()) / len(shares) for k in ("lesion", "lesion_area", "glass")} \
        if shares else None
    record = {"minutes": minutes, "stage_seconds": stage_seconds, "test": metrics,
              "pretrain": {k: s[k] for k in ("steps", "first_loss", "final_loss", "train_seconds")},
              "attention_shares": shares, "mean_attention_shares": mean,
              "predict_vs_evaluate_max_difference": difference}
    (out / "demo_result.json").write_text(json.dumps(record, indent=1))
    _print_closing(out, minutes, stage_seconds, pre, config, run_dir, csv_path, predictions_dir, summary_png,
                   settings, mean, len(shares))
    return record


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _print_closing(out: Path, minutes: float, stage_seconds: dict[str, float], pre: PretrainConfig,
                   config: TrainConfig, run_dir: Path, csv_path: Path, predictions_dir: Path, summary_png: Path,
                   settings: DemoSettings, mean: dict | None, n_test: int) -> None:
    stages = ", ".join(f"{name} {seconds / 60:.1f}" for name, seconds in stage_seconds.items())
    lines = [f"\ndone in {minutes:.1f} min ({stages} min).", ""]
    if mean is not None:
        lines += [f"Where the model looked, over the {n_test} test slides: on average {mean['lesion']:.0%} of the "
                  f"attention on the tissue fell on the lesion, which is {mean['lesion_area']:.0%} of the tissue (what "
                  f"attention spread evenly would give); {mean['glass']:.0%} of H's attention fell on glass (the "
                  "pictures leave it out).", ""]
    lines += [
        f"The picture: {summary_png}",
        f"  top: {settings.heatmaps_per_class} test slide(s) of each class (the first by slide id): the slide with "
        "the lesion the generator drew (green), and beside it where the model looked on the tissue (attention "
        "relative to uniform, red = most) with the predicted class, its probability, ✓/✗ against the truth and "
        "the attention's shares on the lesion and on glass;",
        "  bottom: ROC curves of the test split, training loss and accuracy per epoch, pretraining loss per step.",
        "",
        "Files, and the command that made each:",
        f"  {out / 'cohort'}/ (slides/, masks/ = known lesions, cohort.csv, synth.json)",
        "      this demo (Python: wsilocal.synth.synthesize_cohort; `wsilocal synth --out DIR` writes the "
        "generator's full-difficulty cohorts)",
        f"  {pre.out}/resnet34.safetensors, loss_curve.png, pretrain_log.csv",
        f"      {command_line('pretrain', pre)}",
        f"  {run_dir}/checkpoint_best.pt, curves.png, metrics.csv, config.yaml, train.log",
        f"      {command_line('train', config)}",
        f"  {run_dir}/metrics_test.json, predictions_test.csv, roc_test.png",
        f"      wsilocal evaluate {run_dir} --split test",
        f"  {predictions_dir}/predictions.csv, <slide>_heatmap.png, _attention.npy/.json/.geojson (QuPath)",
        f"      wsilocal predict --run {run_dir} --cohort {csv_path} --split test --out {predictions_dir} --heatmap",
        f"  {summary_png}, {out / 'demo_result.json'}",
        f"      wsilocal demo --out {out}" + (" --quick" if settings == QUICK else ""),
        "",
        "On your own slides (any format OpenSlide reads):",
        f"  wsilocal predict --run {run_dir} slide1.svs slide2.ndpi --out my_predictions --heatmap",
    ]
    print("\n".join(lines))
