"""Training: ``train`` (the method), ``pretrain`` (self-supervised pretraining of the trunk), ``baseline`` (a
tile-feature MIL baseline). Each resolves its configuration once (:func:`wsilocal.config.resolve_config`: YAML file,
then the options given), and ``train``/``pretrain --devices N`` start themselves N times under torchrun."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from wsilocal.errors import WsilocalError

T = TypeVar("T")
CONFIG_HELP = "YAML config; every key can be overridden with --key value"


def _add_distributed_run_arguments(p: argparse.ArgumentParser, cls: type, resume: tuple[str, str],
                                   devices_help: str) -> None:
    """The options ``train`` and ``pretrain`` share: a config file, ``--resume``, ``--devices`` and every field
    of ``cls`` as a flag. ``resume`` is the folder's metavar and the option's help."""
    from wsilocal.config import add_config_arguments

    p.add_argument("config", nargs="?", help=CONFIG_HELP)
    p.add_argument("--resume", metavar=resume[0], help=resume[1])
    p.add_argument("--devices", type=int, default=1, metavar="N", help=devices_help)
    add_config_arguments(p, cls)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from wsilocal.config import TrainConfig

    _add_distributed_run_arguments(
        p, TrainConfig, ("RUN_DIR", "continue the run in RUN_DIR from its last checkpoint"),
        "train with N processes on this machine (one per GPU; CPU: gloo), via torchrun")


def run_train(args: argparse.Namespace) -> int:
    from wsilocal.config import TrainConfig, overrides_from_args, resolve_config
    from wsilocal.train.trainer import train

    path = _config_to_resume(args.resume) if args.resume else args.config
    config = resolve_config(path, overrides_from_args(args, TrainConfig), TrainConfig)
    result, code = _on_every_rank(args, config.device, lambda: train(config, resume=bool(args.resume)))
    if code is not None:
        return code
    return _report_run(result)


def _report_run(result) -> int:
    """Print a finished run's best epoch and validation scores (n/a where undefined) and its warnings; exit code
    1 when slides were skipped (like prepare: the run finished, but not on every slide)."""
    best = {k: "n/a" if result.best_val.get(k) is None else f"{result.best_val[k]:.3f}"
            for k in ("balanced_accuracy", "auroc")}
    print(f"run {result.run_dir}: best epoch {result.best_epoch}, validation balanced accuracy "
          f"{best['balanced_accuracy']}, AUROC {best['auroc']}")
    for warning in result.warnings:
        print(warning)
    return 1 if result.skipped else 0


def add_pretrain_arguments(p: argparse.ArgumentParser) -> None:
    from wsilocal.config import PretrainConfig

    _add_distributed_run_arguments(
        p, PretrainConfig, ("OUT", "continue the pretraining in OUT from its checkpoint"),
        "N processes on this machine (one per GPU; CPU: gloo), via torchrun")


def run_pretrain(args: argparse.Namespace) -> int:
    from wsilocal.config import PretrainConfig, overrides_from_args, resolve_config
    from wsilocal.pretrain.trainer import load_pretrain_config, pretrain

    overrides = overrides_from_args(args, PretrainConfig)
    if args.resume:  # the folder's own settings; only the execution ones may change
        config = load_pretrain_config(args.resume, overrides)
    else:
        config = resolve_config(args.config, overrides, PretrainConfig)
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


def add_baseline_arguments(p: argparse.ArgumentParser) -> None:
    from wsilocal.config import BaselineConfig, add_config_arguments
    from wsilocal.models.mil import MIL_MODELS  # torch: the names of the models are its keys

    p.add_argument("config", nargs="?", help=CONFIG_HELP)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_config_arguments(p, BaselineConfig, skip={"model"})
    p.add_argument("--model", choices=list(MIL_MODELS), help="the MIL model")


def run_baseline(args: argparse.Namespace) -> int:
    from wsilocal.config import BaselineConfig, overrides_from_args, resolve_config
    from wsilocal.train.baseline import train_baseline

    path = _config_to_resume(args.out or ".", " (give the run directory with --out)") if args.resume else args.config
    config = resolve_config(path, overrides_from_args(args, BaselineConfig), BaselineConfig)
    return _report_run(train_baseline(config, resume=args.resume))


def _config_to_resume(run_dir: str, hint: str = "") -> Path:
    """The config.yaml of the run directory that ``--resume`` continues (WsilocalError when it has none)."""
    from wsilocal.run.directory import RunDirectory

    run = RunDirectory(run_dir)
    if not run.config_file.is_file():
        raise WsilocalError(f"{run.path}: cannot resume, no config.yaml in it{hint}")
    return run.config_file


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
