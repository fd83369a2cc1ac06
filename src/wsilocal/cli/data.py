"""The cohort's files: ``synth`` (a synthetic cohort), ``prepare`` (the 5x cache), ``features`` (tile features for
the MIL baselines), ``inspect`` (one slide)."""

from __future__ import annotations

import argparse
from pathlib import Path

from wsilocal.cli.commands import STRICT_HELP


def add_synth_arguments(p: argparse.ArgumentParser) -> None:
    from wsilocal.config import parse_height_width

    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", choices=["morphology", "context"], default="morphology",
                   help="class = arrangement of tumour nuclei (morphology), or near/far tumour–follicle (context)")
    p.add_argument("--classes", type=int, help="number of classes, morphology task (default 3)")
    p.add_argument("--slides-per-class", type=int, default=10)
    p.add_argument("--size", type=parse_height_width, help="level-0 size WIDTHxHEIGHT at 0.25 µm/px "
                   "(default 8192x8192; context task 28800x12800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)


def run_synth(args: argparse.Namespace) -> int:
    from wsilocal.synth import SynthParams, synthesize_cohort

    size = None if args.size is None else (args.size[1], args.size[0])  # the generator takes (width, height)
    csv_path = synthesize_cohort(args.out, classes=args.classes, slides_per_class=args.slides_per_class,
                                 size=size, seed=args.seed, workers=args.workers,
                                 params=SynthParams(task=args.task))
    print(f"wrote synthetic cohort {csv_path}")
    return 0


def add_prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cohort", help="cohort CSV (slide_id,path,label,split[,case_id])")
    p.add_argument("--cache", help="cache folder (default: <cohort folder>/cache)")
    p.add_argument("--mpp", type=float, default=2.0, help="target µm/px (default 2.0 ≈ 5x)")
    p.add_argument("--assume-mpp", type=float, help="µm/px of slides without resolution metadata")
    p.add_argument("--max-pixels", type=int, default=1_600_000_000, help="refuse larger tissue images")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="allow relative slide paths that lead outside the CSV's folder")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)


def run_prepare(args: argparse.Namespace) -> int:
    from wsilocal.prepare.cache import PrepareSettings, format_summary, prepare_cohort
    from wsilocal.slide.cohort import load_cohort

    # Missing or unreadable slide files are skipped and listed (exit code 1); --strict refuses them before any work.
    cohort = load_cohort(args.cohort, check_files=args.strict, allow_outside=args.allow_outside_paths)
    cache = Path(args.cache) if args.cache else Path(args.cohort).parent / "cache"
    settings = PrepareSettings(mpp=args.mpp, assume_mpp=args.assume_mpp, max_pixels=args.max_pixels)
    result, stats = prepare_cohort(cohort, cache, settings, workers=args.workers)
    print(format_summary(cohort, result))
    if "mean" in stats:
        print("train mean " + " ".join(f"{v:.4f}" for v in stats["mean"]) + "  std "
              + " ".join(f"{v:.4f}" for v in stats["std"]) + f"  → {cache / 'stats.json'}")
    return 1 if result.skipped else 0


def add_features_arguments(p: argparse.ArgumentParser) -> None:
    from wsilocal.config import ARCHS

    p.add_argument("--cohort", required=True, help="cohort CSV (slide_id,path,label,split[,case_id])")
    p.add_argument("--out", required=True, help="folder of the <slide_id>.h5 feature files")
    p.add_argument("--mpp", type=float, default=2.0, help="tile resolution in µm/px (default 2.0 ≈ 5x)")
    p.add_argument("--tile", type=int, default=256, help="tile edge in pixels at --mpp (default 256)")
    p.add_argument("--min-tissue", type=float, default=0.25, help="minimum tissue fraction of a tile")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per forward pass")
    p.add_argument("--arch", choices=ARCHS, default="resnet34",
                   help="feature extractor: resnet18, resnet34 (the paper's, default) or resnet50 (2048-d features)")
    p.add_argument("--weights", help="state dict of --arch (.pth/.pt/.bin/.safetensors; torchvision, timm or a "
                                     "self-supervised checkpoint); default random (warned)")
    p.add_argument("--assume-mpp", type=float, help="µm/px of slides without resolution metadata")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=0, help="threads reading tiles (default 0: none)")
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="allow relative slide paths that lead outside the CSV's folder")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)


def run_features(args: argparse.Namespace) -> int:
    from wsilocal.features.extract import extract_features, format_summary
    from wsilocal.slide.cohort import load_cohort

    # Missing slide files are skipped and listed by the extraction, not fatal for the whole cohort (unless --strict).
    cohort = load_cohort(args.cohort, check_files=args.strict, allow_outside=args.allow_outside_paths)
    result = extract_features(cohort, args.out, mpp=args.mpp, tile=args.tile, min_tissue=args.min_tissue,
                              batch_size=args.batch_size, weights=args.weights, device=args.device,
                              assume_mpp=args.assume_mpp, workers=args.workers, arch=args.arch)
    print(format_summary(cohort.slides, result))
    print(f"features in {args.out}")
    for warning in result.warnings:
        print(warning)
    return 1 if result.skipped else 0


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide")
    p.add_argument("--thumbnail", help="PNG path (default: <slide name>_thumbnail.png)")
    p.add_argument("--assume-mpp", type=float)


def run_inspect(args: argparse.Namespace) -> int:
    from wsilocal.slide.inspect import format_report, inspect_slide

    thumbnail = Path(args.thumbnail) if args.thumbnail else Path(Path(args.slide).stem + "_thumbnail.png")
    report = inspect_slide(args.slide, thumbnail=thumbnail, assume_mpp=args.assume_mpp)
    print(format_report(report))
    print(f"thumbnail: {thumbnail}")
    return 0
