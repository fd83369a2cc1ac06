"""The ``wsilocal`` command. It only parses arguments and calls the library.

:data:`COMMANDS` lists the commands. Each lives in a module of this package with its options
(``add_<name>_arguments``) and its handler (``run_<name>``), which imports the library functions it calls. A
command's options are defined only when it is chosen (:class:`~wsilocal.cli.commands.CommandParser`), so a command
line loads only what its command needs: ``wsilocal --help`` and ``wsilocal inspect ...`` never load torch.

Every :class:`~wsilocal.errors.WsilocalError` (and an ``OSError`` such as a full disk) becomes one line
``error: ...`` on stderr and exit code 2; an unexpected exception becomes one line and exit code 1 (its
traceback is shown with ``WSILOCAL_TRACEBACK=1``).
"""

from __future__ import annotations

import argparse
import os
import sys

from wsilocal import __version__
from wsilocal.cli import bench, data, demo, evaluation, training
from wsilocal.cli.commands import Command, add_commands
from wsilocal.errors import TrainingInterrupted, WsilocalError
from wsilocal.runtime import tune_cpu_allocator

COMMANDS = (
    Command("synth", "write a synthetic H&E-like cohort of pyramidal slides",
            data.add_synth_arguments, data.run_synth),
    Command("prepare", "read a cohort's slides at the target MPP into the cache",
            data.add_prepare_arguments, data.run_prepare),
    Command("features", "ResNet features of tissue tiles, one HDF5 per slide (MIL baselines)",
            data.add_features_arguments, data.run_features),
    Command("inspect", "describe one slide and write a thumbnail with its tissue box",
            data.add_inspect_arguments, data.run_inspect),
    Command("train", "train a model (config file and/or --options)",
            training.add_train_arguments, training.run_train),
    Command("pretrain", "self-supervised pretraining of the trunk (--arch) on unlabeled slides",
            training.add_pretrain_arguments, training.run_pretrain),
    Command("evaluate", "evaluate a run on a split: metrics JSON, predictions CSV, ROC PNG",
            evaluation.add_evaluate_arguments, evaluation.run_evaluate),
    Command("predict", "predict slide files with a trained run (CSV, optional attention heatmaps)",
            evaluation.add_predict_arguments, evaluation.run_predict),
    Command("baseline", "train a tile-feature MIL baseline (ABMIL, CLAM, ...) on `features` output",
            training.add_baseline_arguments, training.run_baseline),
    Command("bench", "benchmarks: the paper's tables (accuracy, memory, speed), scaling, soak, all",
            bench.add_bench_arguments, None),
    Command("demo", "synthetic cohort → prepare → pretrain → train K=4 → evaluate → predict with heatmaps from "
                    "the slide files → summary.png, in one command", demo.add_demo_arguments, demo.run_demo),
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; a command's own options are defined when it is chosen."""
    parser = argparse.ArgumentParser(prog="wsilocal", description="Whole-slide classification with locally "
                                     "supervised learning (Zhang et al., MICCAI 2022).")
    parser.add_argument("--version", action="version", version=f"wsilocal {__version__}")
    add_commands(parser, COMMANDS, dest="command")
    return parser


def main(argv: list[str] | None = None) -> int:
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
