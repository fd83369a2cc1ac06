"""``wsilocal bench soak``: train a small synthetic cohort for many epochs and check that memory stays flat.

A slow leak — a list that keeps every epoch's tensors, a figure never closed, a growing reader cache — does not
show in a test of two epochs. This benchmark runs the real trainer (every epoch: training, validation,
checkpoints, metrics files, curves) and reads the process's resident memory from ``/proc/self/status`` after each
epoch: ``VmRSS`` (all resident pages) and ``RssAnon`` (heap and other anonymous memory, without the
memory-mapped cache files the page cache may keep resident or drop). After ``--warmup`` epochs (allocator and
library caches filling) a straight line is fitted to ``RssAnon`` against the epoch; a slope above
``--max-slope-mib`` MiB per epoch fails the run (exit code 1).

Writes ``OUT/soak.json`` (settings, per-epoch samples, the fit) and ``OUT/soak.png``; the cohort and the run
directory are kept in ``OUT/cohort`` and ``OUT/run``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from wsilocal.config import TrainConfig
from wsilocal.errors import ConfigError
from wsilocal.plotting import pyplot
from wsilocal.train.trainer import Trainer

MIB = 2**20
STATUS_FIELDS = ("VmRSS", "RssAnon", "VmHWM")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def read_memory() -> dict[str, int]:
    """This process's memory in bytes: ``VmRSS``, ``RssAnon`` and ``VmHWM`` (peak RSS) from
    ``/proc/self/status``, and — with glibc — ``heap_in_use`` (bytes malloc has handed out and not got back)
    and ``heap_total`` (what malloc holds from the OS). RSS growing while ``heap_in_use`` stays flat is memory
    malloc keeps for reuse (fragmentation), not objects kept alive."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in STATUS_FIELDS:
                values[name] = int(rest.split()[0]) * 1024  # the kernel reports kB
    mallinfo2 = _mallinfo2()
    if mallinfo2 is not None:
        info = mallinfo2()
        values["heap_in_use"] = info.uordblks + info.hblkhd
        values["heap_total"] = info.arena + info.hblkhd
    return values


def _mallinfo2():
    try:
        function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    return function


class SoakTrainer(Trainer):
    """The trainer, sampling process memory once per epoch, after everything the epoch writes."""

    def __init__(self, config: TrainConfig):
        super().__init__(config, progress=False)
        self.samples: list[dict] = []
        self.started = time.perf_counter()

    def epoch_done(self, history: list[dict]) -> None:
        # Once the epoch's checkpoint, metrics files and curves are written, before the trainer collects garbage.
        self.samples.append({"epoch": len(history) - 1, "seconds": time.perf_counter() - self.started,
                             **read_memory()})
        super().epoch_done(history)


def fit_slope(samples: list[dict], warmup: int, key: str = "RssAnon") -> dict:
    """Least-squares line through ``key`` (bytes) against the epoch, epochs ≥ ``warmup``: slope in MiB/epoch."""
    points = [(s["epoch"], s[key] / MIB) for s in samples if s["epoch"] >= warmup]
    if len(points) < 3:
        raise ConfigError(f"bench soak: fitting a slope needs at least 3 epochs after the {warmup} warm-up epochs")
    epochs, mib = (np.array(v, dtype=float) for v in zip(*points, strict=True))
    slope, intercept = np.polyfit(epochs, mib, 1)
    return {"key": key, "warmup": warmup, "epochs_fitted": len(points), "slope_mib_per_epoch": float(slope),
            "intercept_mib": float(intercept), "growth_mib": float(mib[-1] - mib[0])}


def run_soak(out: str | Path, *, epochs: int = 60, slides_per_class: int = 3, size: int = 1536, k: int = 4,
             warmup: int = 20, max_slope_mib: float = 1.0, seed: int = 0, threads: int = 0) -> dict:
    """Synthesize a cohort, train it for ``epochs`` epochs sampling memory, fit the slope; write the report."""
    from wsilocal.synth import synthesize_cohort

    if epochs < warmup + 3:
        raise ConfigError(f"bench soak: --epochs must be at least --warmup + 3 = {warmup + 3}, got {epochs}")
    out = Path(out)
    csv = synthesize_cohort(out / "cohort", classes=2, slides_per_class=slides_per_class, size=(size, size),
                            seed=seed, progress=False)
    run = out / "run"
    if run.exists() and any(run.iterdir()):
        raise ConfigError(f"{run}: exists already; give another --out (a soak run starts from scratch)")
    config = TrainConfig(cohort=str(csv), out=str(run), k=k, epochs=epochs, seed=seed, threads=threads,
                         early_stopping=0, plateau_patience=epochs, accumulation=2)  # every epoch runs, same work
    trainer = SoakTrainer(config)
    trainer.run()
    fit = fit_slope(trainer.samples, warmup)
    in_use = fit_slope(trainer.samples, warmup, "heap_in_use") if "heap_in_use" in trainer.samples[0] else None
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(), "python": sys.version.split()[0],
        "settings": {"epochs": epochs, "slides_per_class": slides_per_class, "size": size, "k": k,
                     "warmup": warmup, "max_slope_mib": max_slope_mib, "seed": seed, "threads": threads},
        "samples": trainer.samples,
        "fit": fit,
        "fit_heap_in_use": in_use,  # diagnosis: objects kept alive (in use) or memory malloc keeps (RSS only)
        "passed": fit["slope_mib_per_epoch"] <= max_slope_mib,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    plot_soak(report, out / "soak.png")
    return report


def plot_soak(report: dict, path: Path) -> None:
    """VmRSS and RssAnon per epoch, the warm-up shaded, the fitted line over the rest."""
    plt = pyplot()

    samples, fit = report["samples"], report["fit"]
    epochs = [s["epoch"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, colour, label in (("VmRSS", "tab:gray", "VmRSS"), ("RssAnon", "tab:blue", "RssAnon"),
                               ("heap_in_use", "tab:green", "malloc: bytes in use")):
        if key in samples[0]:
            ax.plot(epochs, [s[key] / MIB for s in samples], marker=".", color=colour, label=label)
    fitted = [e for e in epochs if e >= fit["warmup"]]
    ax.plot(fitted, [fit["intercept_mib"] + fit["slope_mib_per_epoch"] * e for e in fitted], "--", color="tab:red",
            label=f"fit: {fit['slope_mib_per_epoch']:+.3f} MiB/epoch (limit {report['settings']['max_slope_mib']:g})")
    ax.axvspan(-0.5, fit["warmup"] - 0.5, color="0.9", label="warm-up (not fitted)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"Soak: {report['settings']['epochs']} epochs, K={report['settings']['k']}")
    ax.legend(loc="center right", fontsize=8)  # the gap between RSS and the malloc curve
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_soak(report: dict) -> str:
    """A few lines for the terminal."""
    fit, samples = report["fit"], report["samples"]
    first, last = samples[fit["warmup"]], samples[-1]
    verdict = "flat" if report["passed"] else "GROWING"
    in_use = report.get("fit_heap_in_use")
    diagnosis = (f"; malloc bytes in use {first['heap_in_use'] / MIB:.0f} → {last['heap_in_use'] / MIB:.0f} MiB, "
                 f"slope {in_use['slope_mib_per_epoch']:+.3f} MiB/epoch" if in_use else "")
    return (f"{len(samples)} epochs in {last['seconds']:.0f} s; RssAnon {first['RssAnon'] / MIB:.0f} → "
            f"{last['RssAnon'] / MIB:.0f} MiB, VmRSS {first['VmRSS'] / MIB:.0f} → {last['VmRSS'] / MIB:.0f} MiB "
            f"(epochs {fit['warmup']}..{last['epoch']}); peak {last['VmHWM'] / MIB:.0f} MiB{diagnosis}\n"
            f"slope {fit['slope_mib_per_epoch']:+.3f} MiB/epoch (limit {report['settings']['max_slope_mib']:g}): "
            f"{verdict}")


def soak_main(args: argparse.Namespace) -> int:
    """Run the soak from parsed arguments; exit code 1 when memory grows faster than the limit."""
    report = run_soak(args.out, epochs=args.epochs, slides_per_class=args.slides_per_class, size=args.size,
                      k=args.k, warmup=args.warmup, max_slope_mib=args.max_slope_mib, seed=args.seed,
                      threads=args.threads)
    print(format_soak(report))
    print(f"wrote {Path(args.out) / 'soak.json'}, soak.png")
    if not report["passed"]:
        print(f"error: memory grows {report['fit']['slope_mib_per_epoch']:.3f} MiB per epoch, above the limit of "
              f"{args.max_slope_mib:g} MiB (see {Path(args.out) / 'soak.png'})", file=sys.stderr)
        return 1
    return 0
