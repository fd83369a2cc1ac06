"""The ``wsilocal`` command. It only parses arguments and calls the library.

Every :class:`~wsilocal.errors.WsilocalError` (and an ``OSError`` such as a full disk) becomes one line
``error: ...`` on stderr and exit code 2; an unexpected exception becomes one line and exit code 1 (its
traceback is shown with ``WSILOCAL_TRACEBACK=1``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from wsilocal.bench import benchmark_command
from wsilocal.errors import TrainingInterrupted, WsilocalError

T = TypeVar("T")
STRICT_HELP = ("refuse the cohort before any work when a slide file is missing or unreadable (default: skip such "
               "slides, list them with the reason, finish the rest and exit with 1)")

# `wsilocal bench NAME`: (NAME, module of wsilocal.bench with add_NAME_arguments and NAME_main, help).
BENCHMARKS = (
    ("accuracy", "accuracy", "the paper's Tables 1 and 4 on synthetic cohorts: all methods, several seeds"),
    ("memory", "memory", "the paper's Table 2: saved-for-backward bytes, peak RSS and step time per K and size"),
    ("speed", "speed", "the paper's Table 3: whole-slide inference vs the tile pipeline (tiling, ResNet34 "
                       "features, gated ABMIL) per slide size; peak RSS; bfloat16"),
    ("pretrain", "pretrain", "linear and k-NN probes of tile class: random vs `wsilocal pretrain` weights, same run"),
    ("scaling", "scaling", "training throughput with 1 and 2 processes, with/without all-reduce overlap"),
    ("soak", "soak", "train a synthetic cohort for many epochs; fail if process memory grows"),
    ("all", "report", "accuracy, memory, speed and scaling benchmarks and one report.md"),
)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 8192x6144, got {text!r}") from None
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError(f"size must be at least 64x64, got {text!r}")
    return w, h


def cmd_synth(args: argparse.Namespace) -> int:
    from wsilocal.synth import SynthParams, synthesize_cohort

    csv_path = synthesize_cohort(args.out, classes=args.classes, slides_per_class=args.slides_per_class,
                                 size=args.size, seed=args.seed, workers=args.workers,
                                 params=SynthParams(task=args.task))
    print(f"wrote synthetic cohort {csv_path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
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


def cmd_features(args: argparse.Namespace) -> int:
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


def cmd_inspect(args: argparse.Namespace) -> int:
    from wsilocal.slide.inspect import format_report, inspect_slide

    thumbnail = Path(args.thumbnail) if args.thumbnail else Path(Path(args.slide).stem + "_thumbnail.png")
    report = inspect_slide(args.slide, thumbnail=thumbnail, assume_mpp=args.assume_mpp)
    print(format_report(report))
    print(f"thumbnail: {thumbnail}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from wsilocal.config import TrainConfig, config_from_dict, load_config, overrides_from_args
    from wsilocal.run.directory import RunDirectory
    from wsilocal.train.trainer import train

    overrides = overrides_from_args(args)
    if args.resume:
        run = RunDirectory(args.resume)
        if not run.config_file.is_file():
            raise WsilocalError(f"{run.path}: cannot resume, no config.yaml in it")
        config = load_config(run.config_file, overrides)
    elif args.config:
        config = load_config(args.config, overrides)
    else:
        config = config_from_dict(overrides, TrainConfig)
    config.validate()
    result, code = _on_every_rank(args, config.device, lambda: train(config, resume=bool(args.resume)))
    if code is not None:
        return code
    best = result.best_val
    print(f"run {result.run_dir}: best epoch {result.best_epoch}, validation balanced accuracy "
          f"{best.get('balanced_accuracy', float('nan')):.3f}, AUROC {best.get('auroc') or float('nan'):.3f}")
    for warning in result.warnings:
        print(warning)
    return 1 if result.skipped else 0  # like prepare: the run finished, but not on every slide


def _on_every_rank(args: argparse.Namespace, device: str, run: Callable[[], T]) -> tuple[T | None, int | None]:
    """``run()`` in this process, once torchrun runs ``--devices`` copies of the command (it starts them when it
    is not running yet). Returns ``(result, None)`` where this process reports (rank 0, or no torchrun) and
    ``(None, exit code)`` elsewhere."""
    from wsilocal.runtime import resolve_device
    from wsilocal.train.distributed import relaunch_under_torchrun, torchrun_environment

    launched = torchrun_environment()
    if args.devices > 1 and launched is None:  # not yet started by torchrun: start N copies of this command
        return None, relaunch_under_torchrun(args.devices, args.argv, resolve_device(device))
    result = run()
    if launched is not None and launched[0] != 0:
        return None, 0  # rank 0 reports for every rank
    return result, None


def cmd_pretrain(args: argparse.Namespace) -> int:
    from wsilocal.config import PretrainConfig, config_from_dict, load_config, overrides_from_args
    from wsilocal.pretrain.trainer import load_pretrain_config, pretrain

    overrides = overrides_from_args(args, PretrainConfig)
    if args.resume:
        config = load_pretrain_config(args.resume, overrides)
    elif args.config:
        config = load_config(args.config, overrides, PretrainConfig)
    else:
        config = config_from_dict(overrides, PretrainConfig).validate()
    result, code = _on_every_rank(args, config.device, lambda: pretrain(config, resume=bool(args.resume)))
    if code is not None:
        return code
    s = result.summary
    print(f"pretrained {s['steps']} steps on {s['tiles_seen']} tiles of {s['slides']} slides in "
          f"{s['train_seconds'] / 60:.1f} min, loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}")
    for path, reason in s["skipped"].items():
        print(f"skipped {path}: {reason}")
    print(f"weights: {result.weights} (use with --weights); settings and curve: {result.out / 'pretrain.json'}, "
          f"{result.out / 'loss_curve.png'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from wsilocal.run.directory import RunDirectory
    from wsilocal.train.evaluate import evaluate_run, format_metrics

    if args.heatmap and not RunDirectory(args.run).is_baseline:
        raise WsilocalError(f"{args.run}: --heatmap draws a baseline run's tile attention; for a run of the method "
                            f"use `wsilocal predict --run {args.run} --cohort CSV --split {args.split} --heatmap`")
    metrics = evaluate_run(args.run, args.split, checkpoint=args.checkpoint, strict=args.strict)
    print(format_metrics(metrics))
    print(f"wrote {Path(args.run) / f'metrics_{args.split}.json'}, predictions_{args.split}.csv, "
          f"roc_{args.split}.png")
    failed = {}
    if args.heatmap:
        from wsilocal.infer.baseline_predict import evaluation_heatmaps, format_heatmaps

        heatmaps = evaluation_heatmaps(args.run, args.split)
        print(format_heatmaps(heatmaps))
        failed = heatmaps.failed
    return 1 if metrics.get("skipped") or failed else 0


def cmd_predict(args: argparse.Namespace) -> int:
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


def cmd_baseline(args: argparse.Namespace) -> int:
    from wsilocal.config import BaselineConfig, config_from_dict, load_config, overrides_from_args
    from wsilocal.run.directory import RunDirectory
    from wsilocal.train.baseline import train_baseline

    overrides = overrides_from_args(args, BaselineConfig)
    if args.resume:
        run = RunDirectory(args.out or ".")
        if not run.config_file.is_file():
            raise WsilocalError(f"{run.path}: cannot resume, no config.yaml in it (give the run directory with --out)")
        config = load_config(run.config_file, overrides, BaselineConfig)
    elif args.config:
        config = load_config(args.config, overrides, BaselineConfig)
    else:
        config = config_from_dict(overrides, BaselineConfig)
    result = train_baseline(config.validate(), resume=args.resume)
    best = {k: "n/a" if result.best_val.get(k) is None else f"{result.best_val[k]:.3f}"
            for k in ("balanced_accuracy", "auroc")}
    print(f"run {result.run_dir}: best epoch {result.best_epoch}, validation balanced accuracy "
          f"{best['balanced_accuracy']}, AUROC {best['auroc']}")
    for warning in result.warnings:
        print(warning)
    return 1 if result.skipped else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from wsilocal.demo import run_demo

    run_demo(Path(args.out), quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from wsilocal import __version__
    from wsilocal.config import ARCHS, add_config_arguments

    parser = argparse.ArgumentParser(prog="wsilocal", description="Whole-slide classification with locally "
                                     "supervised learning (Zhang et al., MICCAI 2022).")
    parser.add_argument("--version", action="version", version=f"wsilocal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic H&E-like cohort of pyramidal slides")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--task", choices=["morphology", "context"], default="morphology",
                   help="class = arrangement of tumour nuclei (morphology), or near/far tumour–follicle (context)")
    p.add_argument("--classes", type=int, help="number of classes, morphology task (default 3)")
    p.add_argument("--slides-per-class", type=int, default=10)
    p.add_argument("--size", type=_size, help="level-0 size WIDTHxHEIGHT at 0.25 µm/px "
                   "(default 8192x8192; context task 28800x12800)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("prepare", help="read a cohort's slides at the target MPP into the cache")
    p.add_argument("cohort", help="cohort CSV (slide_id,path,label,split[,case_id])")
    p.add_argument("--cache", help="cache folder (default: <cohort folder>/cache)")
    p.add_argument("--mpp", type=float, default=2.0, help="target µm/px (default 2.0 ≈ 5x)")
    p.add_argument("--assume-mpp", type=float, help="µm/px of slides without resolution metadata")
    p.add_argument("--max-pixels", type=int, default=1_600_000_000, help="refuse larger tissue images")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--allow-outside-paths", action="store_true",
                   help="allow relative slide paths that lead outside the CSV's folder")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("features", help="ResNet features of tissue tiles, one HDF5 per slide (MIL baselines)")
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
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("inspect", help="describe one slide and write a thumbnail with its tissue box")
    p.add_argument("slide")
    p.add_argument("--thumbnail", help="PNG path (default: <slide name>_thumbnail.png)")
    p.add_argument("--assume-mpp", type=float)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("train", help="train a model (config file and/or --options)")
    p.add_argument("config", nargs="?", help="YAML config; every key can be overridden with --key value")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="train with N processes on this machine (one per GPU; CPU: gloo), via torchrun")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train)

    from wsilocal.config import PretrainConfig

    p = sub.add_parser("pretrain", help="self-supervised pretraining of the trunk (--arch) on unlabeled slides")
    p.add_argument("config", nargs="?", help="YAML config; every key can be overridden with --key value")
    p.add_argument("--resume", metavar="OUT", help="continue the pretraining in OUT from its checkpoint")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="N processes on this machine (one per GPU; CPU: gloo), via torchrun")
    add_config_arguments(p, PretrainConfig)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("evaluate", help="evaluate a run on a split: metrics JSON, predictions CSV, ROC PNG")
    p.add_argument("run", help="run directory")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--heatmap", action="store_true",
                   help="baseline runs: also draw each slide's tile-attention heatmap into RUN/heatmaps_<split>/")
    p.add_argument("--strict", action="store_true", help=STRICT_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict slide files with a trained run (CSV, optional attention heatmaps)")
    p.add_argument("slides", nargs="*", metavar="SLIDE", help="slide files (id = file name without extension)")
    p.add_argument("--run", required=True, help="run directory of `wsilocal train` or `wsilocal baseline`")
    p.add_argument("--cohort", help="cohort CSV whose slides to predict (instead of SLIDE files)")
    p.add_argument("--split", choices=["train", "val", "test"], help="only this split of --cohort (default: all)")
    p.add_argument("--strict", action="store_true", help="with --cohort: " + STRICT_HELP)
    p.add_argument("--out", required=True, help="folder for predictions.csv, skipped.csv and heatmaps")
    p.add_argument("--heatmap", action="store_true", help="also write attention heatmap PNG, maps and GeoJSON")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--memory-budget-gb", type=float,
                   help="GiB a whole-slide forward may use; larger slides are streamed in exact bands "
                        "(default: half the available RAM / 80%% of free GPU memory)")
    p.add_argument("--band", type=int, help="stream every slide in bands of this many output rows per trunk block "
                        "(default: only slides too large for the memory budget, with the largest band that fits)")
    p.add_argument("--assume-mpp", type=float, help="µm/px of slides without resolution metadata")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--bf16", action="store_true",
                   help="run the trunk in bfloat16 (fast on GPUs and CPUs with AVX-512 BF16/AMX, emulated and "
                        "far slower elsewhere; see docs/inference.md)")
    p.add_argument("--weights", help="baseline runs: the feature extractor's weights file, if it moved since "
                                     "`wsilocal features` (checked by SHA-256)")
    p.set_defaults(func=cmd_predict)

    from wsilocal.config import BaselineConfig
    from wsilocal.models.mil import MIL_MODELS

    # conflict_handler="resolve": the --model added last (with choices) replaces the config field's plain one
    p = sub.add_parser("baseline", help="train a tile-feature MIL baseline (ABMIL, CLAM, ...) on `features` output",
                       conflict_handler="resolve")
    p.add_argument("config", nargs="?", help="YAML config; every key can be overridden with --key value")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_arguments(p, BaselineConfig)
    p.add_argument("--model", choices=list(MIL_MODELS), help="the MIL model")
    p.set_defaults(func=cmd_baseline)

    p = sub.add_parser("bench", help="benchmarks: the paper's tables (accuracy, memory, speed), scaling, soak, all")
    bench = p.add_subparsers(dest="bench", required=True)
    for name, module_name, help_text in BENCHMARKS:  # each benchmark's module owns its options
        add_arguments, run_benchmark = benchmark_command(name, module_name)
        q = bench.add_parser(name, help=help_text)
        add_arguments(q)
        q.set_defaults(func=run_benchmark)

    p = sub.add_parser("demo", help="synthetic cohort → prepare → pretrain → train K=4 → evaluate → predict with "
                                    "heatmaps from the slide files → summary.png, in one command")
    p.add_argument("--out", default="demo_out", help="folder for the cohort, cache, pretraining, run, predictions "
                                                     "and summary.png")
    p.add_argument("--quick", action="store_true", help="a tiny version for smoke tests (about a minute; not accurate)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from wsilocal.runtime import tune_cpu_allocator

    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to start this same command again (train --devices)
    tune_cpu_allocator()
    try:
        return args.func(args)
    except WsilocalError as exc:
        if getattr(exc, "reported_by_rank0", False):  # distributed training: rank 0 prints it for every rank
            return 2
        return _fail(str(exc), 2)
    except TrainingInterrupted as exc:  # Ctrl-C during training: a checkpoint was saved; say how to go on
        print(exc, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # an output the library does not guard itself: disk full, read-only folder, ...
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", 2)
    except MemoryError:
        return _fail("out of memory (try a coarser --mpp, more modules --k 8, or a smaller --max-pixels)", 2)
    except Exception as exc:  # a bug: still one line, the traceback only on request
        if os.environ.get("WSILOCAL_TRACEBACK"):
            raise
        return _fail(f"internal error {type(exc).__name__}: {exc} (please report it; "
                     "set WSILOCAL_TRACEBACK=1 to see the traceback)", 1)


def _fail(message: str, code: int) -> int:
    """Print ``error: message`` as exactly one line on stderr; return the exit code."""
    print("error: " + " ".join(line.strip() for line in message.splitlines()), file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
