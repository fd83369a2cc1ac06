"""The options of every ``wsilocal bench`` command, one ``add_<name>_arguments(parser)`` each.

Torch-free, so that parsing a command line (and ``--help``) loads no benchmark: the options of ``bench memory`` and
``bench speed`` show defaults whose owners would load torch, so those defaults are defined here and their
benchmarks import them (:data:`VARIANTS`, :data:`BATCH_SIZE`, ...). ``bench accuracy`` and ``bench pretrain`` read
their budgets and rows from their own modules, which load without torch (numpy and the generator only). Each
benchmark's options are the same wherever it is run: ``wsilocal bench NAME`` and ``bench all``'s sections alike
(:mod:`wsilocal.bench.commands`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from wsilocal.config import ARCHS, TrainConfig, parse_height_width

# Every benchmark's trunk by default: the one training uses (resnet34, the paper's).
DEFAULT_ARCH = TrainConfig.arch

# --- bench accuracy ------------------------------------------------------------------------------------------


def add_accuracy_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wsilocal bench accuracy``."""
    from wsilocal.bench.accuracy import DEFAULT_ROWS, FULL, INITS, PRETRAIN_FULL, QUICK, ROWS

    parser.add_argument("--out", required=True, help="folder for cohorts, runs and accuracy.json/.md/.png")
    parser.add_argument("--quick", action="store_true", help="small cohorts, 1 epoch, 2 seeds (≤ 15 min)")
    parser.add_argument("--seeds", type=int, help="seeds per method (default 1, 3 for the full table; --quick 2)")
    parser.add_argument("--arch", choices=list(ARCHS), default=DEFAULT_ARCH,
                        help="every method's trunk (default resnet34, the paper's; resnet18 about halves CPU time)")
    parser.add_argument("--weights", help="state dict of --arch (.pth/.pt/.bin/.safetensors, torchvision, timm or "
                                          "self-supervised), e.g. ImageNet weights as in the paper; default: random "
                                          "weights for every method")
    parser.add_argument("--init", choices=INITS, help="without --weights: every method starts from `wsilocal "
                        "pretrain` on each task's own train and val slides (pretrained, the default) or from random "
                        "weights; proxy: then (from --weights when given) a SUPERVISED proxy pretraining on the "
                        "tissue-type masks of other generator slides, labelled as such in the report")
    parser.add_argument("--pretrain-steps", type=int,
                        help=f"steps of that pretraining (default {PRETRAIN_FULL['steps']}; --quick "
                             f"{QUICK.pretrain.get('steps')})")
    parser.add_argument("--epochs", type=int, help=f"epochs of our network (default {FULL.epochs}; --quick "
                                                   f"{QUICK.epochs}); from random weights it needs far more")
    parser.add_argument("--mil-epochs", type=int, help=f"epochs of the MIL baselines (default {FULL.mil_epochs})")
    parser.add_argument("--slides-per-class", type=int,
                        help="slides per class of every cohort (default "
                             f"{FULL.cohorts[0].slides_per_class}); another count is another cohort")
    parser.add_argument("--confirm", type=int, metavar="N",
                        help="also score every finished run, as it is, on a fresh test cohort of N slides per class "
                             "(another generator seed: slides no run, pretraining or choice has seen) and decide the "
                             "claims again on those slides alone (OUT/cohorts/<task>-confirm-N, RUN/confirm-N)")
    parser.add_argument("--tasks", nargs="+", choices=[c.task for c in FULL.cohorts],
                        help="tasks to run (default: all)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), metavar="ROW",
                        help=f"methods to run (default: {' '.join(DEFAULT_ROWS)}; also: "
                             f"{' '.join(r for r in ROWS if r not in DEFAULT_ROWS)})")


# --- bench memory --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """How the memory benchmark computes a training step; every variant runs the same network (same parameters,
    same losses)."""

    name: str
    fold_bn: bool
    recompute: bool
    balanced: bool
    description: str
    streaming: bool = False


VARIANTS = {v.name: v for v in (
    Variant("paper", False, False, False, "paper-style: BatchNorm run as a layer, the authors' split"),
    Variant("folded", True, False, False, "BatchNorm folded into the convs, the authors' split"),
    Variant("recompute", True, True, False, "folded + per-block activation recomputation"),
    Variant("balanced", True, False, True, "folded + block-level split balancing the modules' memory"),
    Variant("balanced-recompute", True, True, True, "folded + balanced split + recomputation"),
    Variant("streaming", True, False, False, "folded, streamed tile by tile with exact gradients: StreamingCNN "
            "at K=1, streaming local learning at K>1 (x_i in a memory-mapped store on CPU)", streaming=True),
)}
DEFAULT_VARIANTS = ("paper", "folded", "recompute", "balanced-recompute")


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wsilocal bench memory``."""
    tile = TrainConfig.stream_tile  # the streaming tile training uses by default
    parser.add_argument("--out", required=True, help="directory for memory.json, memory.md, memory.png")
    parser.add_argument("--sizes", nargs="+", type=parse_height_width, default=None, metavar="N|WxH",
                        help="input sizes (default 1024 2048 4096)")
    parser.add_argument("--k", nargs="+", type=int, default=None, choices=[1, 2, 4, 8],
                        help="numbers of modules (default 1 2 4 8)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(VARIANTS),
                        help=f"how the step is computed (default {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per network (default 2; 0: no timing)")
    parser.add_argument("--no-rfr", action="store_true",
                        help="without the RFR decoders (the paper's ablation)")
    parser.add_argument("--streaming-sizes", nargs="+", type=parse_height_width, default=(), metavar="N|WxH",
                        help="further sizes measured with the streaming variant only (too large for the plain step)")
    parser.add_argument("--tile", type=int, default=tile,
                        help=f"streaming: output block per window in image px (default {tile})")
    parser.add_argument("--window-mib", type=int, default=0,
                        help="streaming: instead of --tile, per-module tiles whose windows save about this many MiB")
    parser.add_argument("--arch", choices=list(ARCHS), default=DEFAULT_ARCH,
                        help=f"the trunk (default {DEFAULT_ARCH}, the paper's)")
    parser.add_argument("--stream-store", choices=["disk", "memory"], default=None,
                        help="streaming local learning: where x_i waits between modules (default: memory-mapped "
                             "files on CPU, whose pages do not count in the peak RSS; host memory on a GPU)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: sizes 512 1024, K 1 4, one timed round")


# --- bench speed ---------------------------------------------------------------------------------------------

BATCH_SIZE = 64  # tiles per extractor forward in the tile pipeline
SCAN_MPP = 1.0  # level-0 µm/px of the generated slides


def pipeline_workers() -> int:
    """Reader threads of the tile pipeline: as many as our reader decodes bands with, so both read with the same
    cores."""
    from wsilocal.slide.reader import MAX_READ_THREADS, usable_cores

    return min(MAX_READ_THREADS, usable_cores())


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wsilocal bench speed``."""
    workers = pipeline_workers()
    parser.add_argument("--out", required=True, help="directory for speed.json, speed.md, speed.png (and slides/)")
    parser.add_argument("--sizes", nargs="+", type=parse_height_width, default=None, metavar="N|WxH",
                        help="tissue image sizes at 5x (default 2048 4096 8192)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up (default 3)")
    parser.add_argument("--run", help="take our trunk and H from this training run (default: random weights)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--workers", type=int, default=workers,
                        help=f"tile reader threads of the pipeline (default {workers}: the threads our reader "
                             "uses here; 0: none)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help=f"tiles per extractor forward in the pipeline (default {BATCH_SIZE})")
    parser.add_argument("--arch", choices=list(ARCHS), default=DEFAULT_ARCH,
                        help="backbone of ours and of the pipeline's extractor, without --run (default resnet34)")
    parser.add_argument("--scan-mpp", type=float, default=SCAN_MPP,
                        help=f"level-0 µm/px of the generated slides (default {SCAN_MPP}; 0.25 writes 40x files)")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 measurements")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS measurements")
    parser.add_argument("--quick", action="store_true", help="smoke test: sizes 512 1024 1536, one round")


# --- bench pretrain ------------------------------------------------------------------------------------------


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wsilocal bench pretrain``."""
    from wsilocal.bench.pretrain import FULL

    parser.add_argument("--out", required=True, help="folder for pretrain.json/.md/.png (and, without "
                                                     "--accuracy-out, the cohort and the pretraining)")
    parser.add_argument("--accuracy-out", help="the accuracy benchmark's OUT: use (or make) its cohort and "
                                               "pretraining there, so both benchmarks share them")
    parser.add_argument("--quick", action="store_true", help="a small cohort and a few steps (a plumbing check)")
    parser.add_argument("--steps", type=int, help=f"pretraining steps (default {FULL.pretrain['steps']})")
    parser.add_argument("--objective", choices=("vicreg", "simclr"), help="self-supervised objective")
    parser.add_argument("--batch-size", type=int, help="tiles per step")
    parser.add_argument("--tile", type=int, help="edge of a pretraining tile in px (views are crops of it)")
    parser.add_argument("--crop", type=int, help="edge of a view in px")


# --- bench scaling, bench soak -------------------------------------------------------------------------------


def add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wsilocal bench scaling``."""
    parser.add_argument("--out", default="bench_scaling", help="directory for scaling.json and scaling.png")
    parser.add_argument("--size", type=int, default=384, help="side of the random input image in px (default 384)")
    parser.add_argument("--k", type=int, default=4, choices=[1, 2, 4, 8], help="number of modules (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")


def add_soak_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wsilocal bench soak``."""
    parser.add_argument("--out", required=True, help="folder for soak.json, soak.png, the cohort and the run")
    parser.add_argument("--epochs", type=int, default=60, help="epochs to train (default 60)")
    parser.add_argument("--warmup", type=int, default=20, help="first epochs left out of the fit (default 20)")
    parser.add_argument("--max-slope-mib", type=float, default=1.0,
                        help="fail (exit 1) above this many MiB of RssAnon growth per epoch (default 1)")
    parser.add_argument("--slides-per-class", type=int, default=3, help="synthetic slides per class (2 classes)")
    parser.add_argument("--size", type=int, default=1536, help="level-0 side of the synthetic slides (px)")
    parser.add_argument("--k", type=int, default=4, choices=[1, 2, 4, 8], help="number of modules (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


# --- bench all -----------------------------------------------------------------------------------------------

# The benchmarks `bench all` runs, in the order of its report (bench/report.py).
SECTIONS = ("accuracy", "pretrain", "memory", "speed", "scaling")


def add_all_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``wsilocal bench all``."""
    parser.add_argument("--out", required=True, help="folder: one subfolder per benchmark, report.md, report.json")
    parser.add_argument("--quick", action="store_true", help="every benchmark's quick variant")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="benchmarks to run (default: all); the report includes every section found in --out")
    parser.add_argument("--weights", help="ResNet34 state dict for the accuracy benchmark (ImageNet weights, as in "
                                          "the paper); default: random weights")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write report.md and report.json from the sections already in --out "
                             "(e.g. after `wsilocal bench accuracy --out OUT/accuracy --tasks ...`)")
