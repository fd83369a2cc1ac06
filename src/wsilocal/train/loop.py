"""The epoch loop both trainers run: phases, validation, early stopping, the best checkpoint, metrics files, resume.

The method's trainer (:mod:`wsilocal.train.trainer`: phases of modules) and the MIL-baseline trainer
(:mod:`wsilocal.train.baseline`: training stages) each hand an :class:`EpochLoop` a :class:`Phases` — what an
epoch of theirs trains and validates, their optimizers and their checkpoint payload — and the loop does the rest,
the same way for both:

- per phase: an optimizer and learning-rate schedule (restored when resuming inside that phase), then epochs until
  the phase's count or early stopping (``early_stopping`` epochs without a lower validation loss, never before
  ``min_epochs``);
- per epoch: the epoch's row (training figures, validation figures, learning rates) appended to the history;
  ``checkpoint_best.pt`` when an epoch of the *last* phase has the best validation score (``best_by``,
  :func:`~wsilocal.train.metrics.selection_score`); ``checkpoint_last.pt`` with everything a resume needs;
  ``metrics.csv``/``metrics.json``/``curves.png`` at most every ``metrics_interval`` seconds (and at the end of a
  phase); the row in the log;
- a stop requested (Ctrl-C, see :func:`stop_on_interrupt`) is honoured after the epoch's checkpoint, or mid-epoch
  when a phase's ``train_epoch`` raises :class:`MidEpochStop`: the checkpoint then holds where the epoch was.

Resume restores the history, the best so far, the phase and epoch, the optimizer and schedule, so a resumed run
ends with the weights of an uninterrupted one. The resumable fields of ``checkpoint_last.pt`` keep each trainer's
names (``phase``/``phase_best`` for the method, ``stage``/``stage_best`` for a baseline): runs written before
resume as they did.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from wsilocal.atomic import write_text_atomic
from wsilocal.errors import ConfigError, TrainingInterrupted
from wsilocal.run.directory import RunDirectory
from wsilocal.train.checkpoint import load_checkpoint, load_model_state
from wsilocal.train.distributed import DistContext
from wsilocal.train.metrics import plot_learning_curves, selection_score

log = logging.getLogger("wsilocal")


# --- the run directory: set-up, log, resume, summary --------------------------------------------------------
def refuse_existing_run(run: RunDirectory, resume: bool) -> None:
    """A new run (not ``resume``) never overwrites one that was started in ``run``."""
    if not resume and run.holds_run:
        raise ConfigError(f"{run.path}: run directory already holds a run; use --resume to continue it "
                          "or choose another --out")


def setup_logging(run: RunDirectory) -> None:
    """Create the run directory; log to RUN/train.log (everything) and stderr (warnings) — progress bars stay
    readable."""
    run.path.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        if getattr(handler, "_wsilocal", False):
            log.removeHandler(handler)
            handler.close()
    file_handler = logging.FileHandler(run.log_file)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    file_handler._wsilocal = True  # type: ignore[attr-defined]
    log.addHandler(file_handler)


def load_resume_state(run: RunDirectory, model: torch.nn.Module, signature: dict,
                      ctx: DistContext | None = None) -> dict:
    """``checkpoint_last.pt`` (read on rank 0, checked against ``signature``), its weights loaded into ``model``."""
    path = run.checkpoint_file("last")
    state = (ctx or DistContext()).on_main(lambda: load_checkpoint(path, expected_signature=signature))
    load_model_state(model, state, path)
    return state


@dataclass
class TrainResult:
    """What a training run ends with (``summary.json`` holds the same, in the run directory)."""

    run_dir: Path
    best_epoch: int
    best_val: dict
    history: list[dict]
    skipped: dict[str, str]
    warnings: list[str]


# --- what a trainer gives the loop --------------------------------------------------------------------------
@dataclass
class Validation:
    """One epoch's validation: the mean loss, the metrics ``best_by`` scores, and the row's validation columns."""

    loss: float
    metrics: dict
    row: dict


def validation_row(loss: float, metrics: dict) -> dict:
    """The validation columns every epoch row has (a trainer may add its own after them)."""
    return {"val_loss": loss, "val_accuracy": metrics["accuracy"],
            "val_balanced_accuracy": metrics["balanced_accuracy"], "val_auroc": metrics["auroc"]}


class MidEpochStop(Exception):
    """Raised by a :meth:`Phases.train_epoch` after the optimizer step during which a stop was requested.

    ``state``: what the phase needs to finish the epoch later (saved as the checkpoint's ``mid_epoch``, handed back
    to ``train_epoch`` on resume); ``done``: how far the epoch got, for the message.
    """

    def __init__(self, state: dict, done: str):
        super().__init__()
        self.state, self.done = state, done


class Phases(Protocol):
    """A trainer's side of the loop: its phases, and what one epoch of each trains and validates."""

    checkpoint_key: str  # "phase" or "stage": names of the resumable fields in checkpoint_last.pt
    n_phases: int

    def phase_label(self, p: int) -> str:
        """How the log names phase ``p`` ("phase 1", "stage rnn")."""

    def phase_epochs(self, p: int) -> int:
        """The most epochs phase ``p`` runs."""

    def start_phase(self, p: int, resumed: bool) -> tuple[torch.optim.Optimizer, object | None]:
        """Set up phase ``p``; its optimizer and learning-rate scheduler (None: none). ``resumed``: the loop then
        loads their states from the checkpoint."""

    def train_epoch(self, p: int, epoch: int, optimizer: torch.optim.Optimizer, mid_epoch: dict | None) -> dict:
        """One epoch (its rest, from ``mid_epoch``); its row. May raise :class:`MidEpochStop`."""

    def validate(self, p: int) -> Validation:
        """Validate the model as phase ``p`` leaves it."""

    def scored(self, p: int, score: tuple, epoch_index: int) -> None:
        """Phase ``p``'s epoch ``epoch_index`` (in the history) was validated with ``best_by`` score ``score``."""

    def end_phase(self, p: int, history: list[dict]) -> None:
        """Phase ``p`` is over (also when a resumed run finds it stopped early)."""

    def epoch_done(self, history: list[dict]) -> None:
        """The last thing of every epoch, after its checkpoint and metrics files are written."""

    def resumable(self, mid_epoch: dict | None) -> dict:
        """The phase's own fields of ``checkpoint_last.pt`` (beside the loop's)."""

    def save_checkpoint(self, path: Path, extra: dict) -> None:
        """Write a checkpoint of the model at ``path``, with the fields ``extra``."""


# --- Ctrl-C -------------------------------------------------------------------------------------------------
@contextmanager
def stop_on_interrupt(flag: threading.Event, armed: Callable[[], bool]) -> Iterator[None]:
    """While inside: a SIGINT while ``armed()`` sets ``flag`` (the trainer stops after the current optimizer
    step); otherwise — before training starts, or a second Ctrl-C — KeyboardInterrupt as usual. Only in the
    main thread (signals are delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        if flag.is_set() or not armed():
            raise KeyboardInterrupt
        flag.set()
        tqdm.write("interrupt: stopping after the current step to save a checkpoint (Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_agreed(flag: threading.Event, ctx: DistContext) -> bool:
    """Whether a stop was requested (on any rank: every rank must leave at the same step)."""
    requested = flag.is_set()
    if not ctx.distributed:
        return requested
    flag_tensor = torch.tensor([float(requested)], device=ctx.device)
    dist.all_reduce(flag_tensor, op=dist.ReduceOp.MAX)
    return bool(flag_tensor.item())


# --- learning-rate schedules --------------------------------------------------------------------------------
def load_lr_scheduler_state(scheduler, saved: dict) -> None:
    """Resume a schedule. A cosine phase then takes its epoch's rate on the current curve: the run may be
    resumed with more epochs than it was started with (its saved rate would be the old curve's)."""
    scheduler.load_state_dict(saved)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        for group, base, rate in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                     strict=True):
            group["lr"] = base * rate(scheduler.last_epoch)


def plateau_scheduler(optimizer: torch.optim.Optimizer, factor: float,
                      patience: int) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """The paper's schedule: the rate × ``factor`` after ``patience`` epochs without a lower validation loss."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=factor, patience=patience)


def step_lr_scheduler(scheduler, val_loss: float) -> None:
    """End of an epoch: the plateau schedule reads the validation loss, the cosine one only counts epochs."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


# --- the loop -----------------------------------------------------------------------------------------------
class EpochLoop:
    """Runs a trainer's :class:`Phases` in a run directory (see the module's docstring).

    ``warnings`` is the trainer's list (saved in every checkpoint, so a resumed run reports them);
    ``stop_requested`` is the flag Ctrl-C sets; ``resume_hint`` the command the interrupted message suggests.
    Only rank 0 of ``ctx`` writes files.
    """

    def __init__(self, run: RunDirectory, phases: Phases, *, best_by: str, early_stopping: int, min_epochs: int = 0,
                 metrics_interval: float = 0.0, warnings: list[str], resume_hint: str,
                 stop_requested: threading.Event | None = None, ctx: DistContext | None = None,
                 progress: bool = True):
        self.directory, self.phases = run, phases
        self.best_by, self.early_stopping, self.min_epochs = best_by, early_stopping, min_epochs
        self.metrics_interval = metrics_interval
        self.warnings, self.resume_hint = warnings, resume_hint
        self.stop_requested = stop_requested or threading.Event()
        self.ctx = ctx or DistContext()
        self.progress = progress

    def run(self, state: dict | None = None) -> tuple[dict, list[dict]]:
        """Every phase from the start, or from ``state`` (``checkpoint_last.pt`` of an earlier start); the best
        epoch (``{"score", "epoch", "val"}``) and the history."""
        phases, key = self.phases, self.phases.checkpoint_key
        history: list[dict] = state["history"] if state else []
        phase_index = state[key] if state else 0
        start_epoch = state["next_epoch"] if state else 0
        best = state["best"] if state else {"score": None, "epoch": -1, "val": {}}
        restore = state is not None
        if state and state["stopped_early"]:  # that phase is over, even if its epochs were raised since
            phases.end_phase(phase_index, history)  # as the uninterrupted run did after it
            phase_index, start_epoch, restore = phase_index + 1, 0, False
        mid_epoch = state.get("mid_epoch") if state else None  # saved by Ctrl-C: continue that epoch
        written_at = -math.inf
        for p in range(phase_index, phases.n_phases):
            resumed = restore and p == phase_index
            optimizer, scheduler = phases.start_phase(p, resumed)
            phase_best = {"loss": math.inf, "bad_epochs": 0}
            if resumed:
                optimizer.load_state_dict(state["optimizer"])
                if scheduler is not None:
                    load_lr_scheduler_state(scheduler, state["scheduler"])
                phase_best = state[f"{key}_best"]
            epoch = start_epoch if p == phase_index else 0
            n_epochs = phases.phase_epochs(p)
            while epoch < n_epochs:
                try:
                    row = phases.train_epoch(p, epoch, optimizer, mid_epoch)
                except MidEpochStop as halt:
                    self._save_last(optimizer, scheduler, p, epoch, False, phase_best, history, best, halt.state)
                    raise self._interrupted(f"{phases.phase_label(p)} epoch {epoch}, {halt.done}") from None
                mid_epoch = None
                validation = phases.validate(p)
                row.update(validation.row)
                step_lr_scheduler(scheduler, validation.loss)
                row["lr"] = [g["lr"] for g in optimizer.param_groups]
                history.append(row)
                improved = validation.loss < phase_best["loss"] - 1e-6
                phase_best = {"loss": min(phase_best["loss"], validation.loss),
                              "bad_epochs": 0 if improved else phase_best["bad_epochs"] + 1}
                score = selection_score(validation.metrics, validation.loss, self.best_by)
                if p == phases.n_phases - 1 and (best["score"] is None or score > tuple(best["score"])):
                    best = {"score": list(score), "epoch": len(history) - 1, "val": validation.metrics}
                    phases.save_checkpoint(self.directory.checkpoint_file("best"), {})
                phases.scored(p, score, len(history) - 1)
                epoch += 1
                stop = bool(self.early_stopping and phase_best["bad_epochs"] >= self.early_stopping
                            and epoch >= self.min_epochs)
                self._save_last(optimizer, scheduler, p, epoch, stop, phase_best, history, best)
                if stop or epoch == n_epochs or time.monotonic() - written_at >= self.metrics_interval:
                    self._write_metrics(history)
                    written_at = time.monotonic()
                phases.epoch_done(history)
                self._report_epoch(row, phases.phase_label(p), stop)
                more = not stop and (epoch < n_epochs or p + 1 < phases.n_phases)
                if more and stop_agreed(self.stop_requested, self.ctx):  # Ctrl-C during validation: saved above
                    raise self._interrupted(f"the end of {phases.phase_label(p)} epoch {epoch - 1}")
                if stop:
                    break
            phases.end_phase(p, history)
            start_epoch = 0
        return best, history

    def finish(self, best: dict, history: list[dict], skipped: dict[str, str], model: str,
               **extra: object) -> TrainResult:
        """Write ``summary.json`` (best epoch, validation metrics, skipped slides, warnings, ``extra``)."""
        summary = {"best_epoch": best["epoch"], "best_validation": best["val"], "epochs_run": len(history),
                   "skipped": skipped, "warnings": self.warnings, "model": model, **extra}
        if self.ctx.is_main:
            write_text_atomic(self.directory.summary_file, json.dumps(summary, indent=1))
        return TrainResult(self.directory.path, best["epoch"], best["val"], history, skipped, self.warnings)

    def _save_last(self, optimizer, scheduler, p: int, next_epoch: int, stopped_early: bool, phase_best: dict,
                   history: list[dict], best: dict, mid_epoch: dict | None = None) -> None:
        """``checkpoint_last.pt``: the model and what resuming exactly needs (``mid_epoch``: Ctrl-C's)."""
        key = self.phases.checkpoint_key
        self.phases.save_checkpoint(self.directory.checkpoint_file("last"), {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            key: p, "next_epoch": next_epoch, "stopped_early": stopped_early, f"{key}_best": phase_best,
            "history": history, "best": best, "warnings": self.warnings, **self.phases.resumable(mid_epoch)})

    def _interrupted(self, where: str) -> TrainingInterrupted:
        checkpoint = self.directory.checkpoint_file("last")
        log.info("interrupted at %s; checkpoint saved", where)
        return TrainingInterrupted(f"interrupted: saved {checkpoint} at {where}; continue with: {self.resume_hint}")

    def _report_epoch(self, row: dict, what: str, stop: bool) -> None:
        """Log an epoch's row (and print it under the progress bars); say when ``what`` stops early."""
        log.info("%s epoch %d: %s", what, row["epoch"], json.dumps(_printable(row)))
        if self.progress:
            tqdm.write(_epoch_line(row))
        if stop:
            log.info("early stopping %s after epoch %d", what, row["epoch"])

    def _write_metrics(self, history: list[dict]) -> None:
        if not self.ctx.is_main:
            return
        write_text_atomic(self.directory.metrics_json, json.dumps(history, indent=1))
        keys = sorted({k for row in history for k in row if not isinstance(row[k], list)})
        with open(self.directory.metrics_csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(history)
        plot_learning_curves(history, self.directory.curves_file)


def _printable(row: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}


def _epoch_line(row: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    aux = " ".join(f"aux{k[7:-9]}={fmt(v)}" for k, v in row.items() if k.startswith("val_aux"))
    streamed = f" ({row['streamed_slides']} slides streamed)" if row.get("streamed_slides") else ""
    return (f"phase {row['phase']} epoch {row['epoch']:>3}: train loss {fmt(row['train_loss'])} "
            f"acc {fmt(row['train_accuracy'])} | val loss {fmt(row['val_loss'])} "
            f"bal.acc {fmt(row['val_balanced_accuracy'])} AUROC {fmt(row['val_auroc'])} | {aux} "
            f"| {row['seconds']:.0f}s{streamed}")
