"""Using a trained run: ``evaluate`` (metrics on a split of its cohort), ``predict`` (slide files or a cohort CSV,
with attention heatmaps)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wsilocal.cli.commands import STRICT_HELP
from wsilocal.errors import WsilocalError

SPLITS = ["train", "val", "test"]
CHECKPOINTS = ["best", "last"]


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--checkpoint", default="best", choices=CHECKPOINTS)
    p.add_argument("--heatmap", action="store_true",
                   help="baseline runs: also draw each slide's tile-attention heatmap into RUN/heatmaps_<split>/")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.add_argument("--cohort", help="evaluate on this split of another cohort CSV (an external test set) instead "
                                    "of the run's own; needs --out")
    p.add_argument("--out", help="with --cohort: folder for its metrics, predictions and ROC curves")
    p.add_argument("--cache", help="with --cohort: where its slides are cached at the run's MPP (default OUT/cache)")
    p.add_argument("--features", help="with --cohort, baseline runs: that cohort's tile features, made by "
                                      "`wsilocal features` with the weights of the run's features")


def run_evaluate(args: argparse.Namespace) -> int:
    from wsilocal.run.directory import RunDirectory
    from wsilocal.train.evaluate import evaluate_run, format_metrics

    if args.heatmap and not RunDirectory(args.run).is_baseline:
        raise WsilocalError(f"{args.run}: --heatmap draws a baseline run's tile attention; for a run of the method "
                            f"use `wsilocal predict --run {args.run} --cohort CSV --split {args.split} --heatmap`")
    for name in ("out", "cache", "features"):
        if getattr(args, name) and not args.cohort:
            raise WsilocalError(f"--{name} goes with --cohort (another cohort to evaluate on)")
    if args.heatmap and args.cohort:
        raise WsilocalError("--heatmap draws the run's own evaluated split; for another cohort use "
                            f"`wsilocal predict --run {args.run} --cohort CSV --heatmap`")
    metrics = evaluate_run(args.run, args.split, checkpoint=args.checkpoint, strict=args.strict,
                           cohort=args.cohort, out=args.out, cache=args.cache, features=args.features)
    print(format_metrics(metrics))
    folder = Path(args.out or args.run)
    print(f"wrote {folder / f'metrics_{args.split}.json'}, predictions_{args.split}.csv, roc_{args.split}.png")
    failed = {}
    if args.heatmap:
        from wsilocal.infer.baseline_predict import evaluation_heatmaps, format_heatmaps

        heatmaps = evaluation_heatmaps(args.run, args.split)
        print(format_heatmaps(heatmaps))
        failed = heatmaps.failed
    return 1 if metrics.get("skipped") or failed else 0


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", nargs="*", metavar="SLIDE", help="slide files (id = file name without extension)")
    p.add_argument("--run", required=True, help="run directory of `wsilocal train` or `wsilocal baseline`")
    p.add_argument("--cohort", help="cohort CSV whose slides to predict (instead of SLIDE files)")
    p.add_argument("--split", choices=SPLITS, help="only this split of --cohort (default: all)")
    p.add_argument("--strict", action="store_true", help="with --cohort: " + STRICT_HELP)
    p.add_argument("--out", required=True, help="folder for predictions.csv, skipped.csv and heatmaps")
    p.add_argument("--heatmap", action="store_true", help="also write attention heatmap PNG, maps and GeoJSON")
    p.add_argument("--checkpoint", default="best", choices=CHECKPOINTS)
    p.add_argument("--memory-budget-gb", type=float,
                   help="GiB a whole-slide forward may use; larger slides are streamed in exact bands "
                        "(default: half the available RAM / 80%% of free GPU memory)")
    p.add_argument("--band", type=int, help="stream every slide in bands of this many output rows per trunk block "
                        "(default: slides too large for the memory budget and, on a CPU, every slide from 1024² px "
                        "at 5x, where streaming is faster; with the largest band that fits)")
    p.add_argument("--assume-mpp", type=float, help="µm/px of slides without resolution metadata")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--bf16", action="store_true",
                   help="run the trunk in bfloat16 (fast on GPUs and CPUs with AVX-512 BF16/AMX, emulated and "
                        "far slower elsewhere; see docs/inference.md)")
    p.add_argument("--weights", help="baseline runs: the feature extractor's weights file, if it moved since "
                                     "`wsilocal features` (checked by SHA-256)")


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from wsilocal.infer.load import load_predictor
    from wsilocal.infer.predict import bfloat16_is_native, cohort_slides, format_run, named_slides, predict_slides

    if bool(args.slides) == bool(args.cohort):
        raise WsilocalError("give slide files or --cohort CSV (not both)")
    if args.split and not args.cohort:
        raise WsilocalError("--split selects slides of a --cohort CSV")
    budget = None if args.memory_budget_gb is None else int(args.memory_budget_gb * 2**30)
    predictor = load_predictor(args.run, args.checkpoint, device=args.device, memory_budget=budget, band=args.band,
                               assume_mpp=args.assume_mpp, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                               weights=args.weights)
    if args.bf16 and not bfloat16_is_native(predictor.device):
        print(f"warning: {predictor.device} has no native bfloat16 (CPUs need AVX-512 BF16 or AMX): PyTorch "
              "emulates it, many times slower than float32; drop --bf16 here", file=sys.stderr)
    slides = (cohort_slides(args.cohort, predictor.classes, args.split, strict=args.strict) if args.cohort
              else named_slides(args.slides))
    run = predict_slides(predictor, slides, args.out, heatmap=args.heatmap)
    print(format_run(run))
    return 1 if run.skipped else 0
