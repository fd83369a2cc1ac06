"""``wsilocal bench scaling``: training throughput with 1 and 2 processes, and what the all-reduce overlap buys.

Each configuration runs the trainer's own pieces — :func:`~wsilocal.train.local_step.local_training_step` on
a random whole "slide", the per-module :class:`~wsilocal.train.distributed.GradientAllReduce`, an AdamW step —
in fresh processes joined in a process group (gloo on the CPU, NCCL on GPUs). Every step is a sync step
(accumulation 1), the worst case for communication. Per configuration and *mode* the median step time is
taken over interleaved rounds after a warm-up (the machines are shared and noisy):

* ``overlap``  — module i's gradients are all-reduced asynchronously while module i+1 computes (the trainer);
* ``after``    — the same all-reduces, started only after the whole step (no overlap);
* ``none``     — no all-reduce at all (ranks do not agree: only a floor for the step time).

Throughput is slides per second of all processes together (each process does one slide per step). The CPU
cores are shared out among the processes (1 process × C threads vs 2 × C/2; one process is also run with
C/2 threads), so on a small CPU two processes compute little faster than one: the speed-up comes from GPUs,
one per process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from wsilocal.models.local_net import LocalNet
from wsilocal.plotting import pyplot
from wsilocal.runtime import tune_cpu_allocator
from wsilocal.train.distributed import DistContext, GradientAllReduce, spawn_processes
from wsilocal.train.local_step import local_training_step
from wsilocal.train.trainer import gradient_buckets

MODES = ("overlap", "after", "none")


@dataclass(frozen=True)
class ScalingSpec:
    """One configuration: device type, number of processes, input and model size, rounds."""

    device: str
    processes: int
    size: int
    k: int
    repeats: int
    warmup: int
    threads: int


def _worker(ctx: DistContext, spec: ScalingSpec, result_file: str) -> None:
    """One process of a configuration: time every mode in interleaved rounds; rank 0 writes the medians."""
    tune_cpu_allocator()  # as the trainer does
    torch.manual_seed(0)
    net = LocalNet(2, spec.k, rfr_patches=10).to(ctx.device)
    net.train()
    ctx.broadcast_module(net)
    optimizer = torch.optim.AdamW(net.param_groups(1e-5, 2e-5), weight_decay=1e-6)
    image = torch.randn(1, 3, spec.size, spec.size, generator=torch.Generator().manual_seed(ctx.rank)).to(ctx.device)
    modes = MODES if ctx.distributed else ("none",)
    times: dict[str, list[float]] = {m: [] for m in modes}
    waits: dict[str, list[float]] = {m: [] for m in modes}
    for round_no in range(spec.warmup + spec.repeats):
        for mode in modes:
            reducer = GradientAllReduce(gradient_buckets(net, range(spec.k)), overlap=mode == "overlap")
            _synchronize(ctx)
            start = time.perf_counter()
            local_training_step(net, image, ctx.rank % 2, generator=torch.Generator().manual_seed(round_no),
                                on_module_backward=reducer.launch if mode != "none" else None)
            if mode != "none":
                reducer.finish()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _synchronize(ctx)  # the step of the slowest rank: the others wait for it at the next all-reduce
            if round_no >= spec.warmup:
                times[mode].append(time.perf_counter() - start)
                waits[mode].append(reducer.wait_seconds)
    allreduce = _time_allreduce(ctx, net, spec) if ctx.distributed else None
    if ctx.is_main:
        result = {**asdict(spec),
                  "step_seconds": {m: statistics.median(v) for m, v in times.items()},
                  "wait_seconds": {m: statistics.median(v) for m, v in waits.items() if m != "none"},
                  "allreduce_seconds": allreduce,
                  "gradient_mib": sum(p.numel() for ps in gradient_buckets(net, range(spec.k)).values()
                                      for p in ps) * 4 / 2**20}
        Path(result_file).write_text(json.dumps(result))


def _synchronize(ctx: DistContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    ctx.barrier()


def _time_allreduce(ctx: DistContext, net: LocalNet, spec: ScalingSpec) -> float:
    """Median time of summing all of one step's gradients, with no compute to hide it behind."""
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    seconds = []
    for round_no in range(spec.warmup + spec.repeats):
        reducer = GradientAllReduce(gradient_buckets(net, range(spec.k)), overlap=False)
        _synchronize(ctx)
        start = time.perf_counter()
        reducer.finish()
        _synchronize(ctx)
        if round_no >= spec.warmup:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(spec: ScalingSpec, folder: Path) -> dict[str, Any]:
    """Run one configuration in fresh processes; its record (medians and throughput per mode)."""
    result_file = folder / f"{spec.device}-{spec.processes}x{spec.threads}.json"
    backend = "nccl" if spec.device == "cuda" else "gloo"
    spawn_processes(_worker, spec.processes, (spec, str(result_file)), backend=backend, threads=spec.threads)
    record = json.loads(result_file.read_text())
    result_file.unlink()
    record["slides_per_second"] = {m: spec.processes / t for m, t in record["step_seconds"].items()}
    return record


def run_scaling_benchmark(out: str | Path, *, size: int = 384, k: int = 4, repeats: int = 3, warmup: int = 1,
                          processes: tuple[int, ...] = (1, 2), progress: bool = True) -> list[dict[str, Any]]:
    """Measure every (device, processes) configuration; write ``scaling.json`` and ``scaling.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    # CPU: the cores shared out among the processes; one process also with one process's share of them, so
    # the table separates "more processes" from "fewer threads per process".
    cpu_runs = {(n, max(1, cores // n)) for n in processes} | {(1, max(1, cores // max(processes)))}
    plans = [ScalingSpec("cpu", n, size, k, repeats, warmup, threads)
             for n, threads in sorted(cpu_runs, key=lambda run: (run[0], -run[1]))]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and dist.is_nccl_available() else 0
    plans += [ScalingSpec("cuda", n, size, k, repeats, warmup, 1) for n in processes if n <= gpus]
    records = []
    for spec in plans:
        if progress:
            print(f"measuring {spec.device} × {spec.processes} process(es), {spec.threads} thread(s) each ...",
                  flush=True)
        records.append(measure(spec, out))
    if processes and max(processes) > gpus > 0:
        print(f"(only {gpus} GPU: no GPU run with more processes than GPUs)")
    report = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu_count": cores,
              "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if gpus else None,
              "records": records}
    (out / "scaling.json").write_text(json.dumps(report, indent=1))
    plot_scaling(records, out / "scaling.png")
    return records


def format_scaling_table(records: list[dict[str, Any]]) -> str:
    """Throughput per configuration and mode, speed-up against one process, and the communication figures."""
    base: dict[str, float] = {}  # per device: one process with the most threads
    for r in records:
        if r["processes"] == 1:
            base.setdefault(r["device"], r["slides_per_second"]["none"])
    lines = [f"{'device':<6} {'procs':>5} {'threads':>7} {'mode':<8} {'step s':>7} {'slides/s':>8} {'speed-up':>8} "
             f"{'wait s':>7}"]
    for r in records:
        for mode, seconds in r["step_seconds"].items():
            speed = r["slides_per_second"][mode]
            wait = r["wait_seconds"].get(mode)
            lines.append(f"{r['device']:<6} {r['processes']:>5} {r['threads']:>7} {mode:<8} {seconds:>7.3f} "
                         f"{speed:>8.2f} {speed / base[r['device']]:>7.2f}× "
                         f"{'' if wait is None else f'{wait:.3f}':>7}")
        if r["allreduce_seconds"] is not None:
            after, overlap = r["step_seconds"]["after"], r["step_seconds"]["overlap"]
            lines.append(f"{'':<6} all-reduce of {r['gradient_mib']:.0f} MiB alone: {r['allreduce_seconds']:.3f} s; "
                         f"overlap saves {after - overlap:+.3f} s per step ({(after - overlap) / after:+.0%})")
    return "\n".join(lines)


def plot_scaling(records: list[dict[str, Any]], path: str | Path) -> None:
    """Bars: slides per second of each configuration and mode."""
    plt = pyplot()

    colours = {"overlap": "tab:blue", "after": "tab:orange", "none": "tab:gray"}
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = []
    for x, r in enumerate(records):
        labels.append(f"{r['device']}\n{r['processes']} proc × {r['threads']} thr")
        modes = list(r["slides_per_second"])
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            offset = (j - (len(modes) - 1) / 2) * width
            ax.bar(x + offset, r["slides_per_second"][mode], width, color=colours[mode],
                   label=mode if mode not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xticks(range(len(records)), labels)
    ax.set_ylabel("slides per second (all processes)")
    size, k = (records[0]["size"], records[0]["k"]) if records else (0, 0)
    ax.set_title(f"training throughput, {size}² px, K={k}, all-reduce every step")
    ax.legend(title="all-reduce")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments, print the table and where the files are."""
    records = run_scaling_benchmark(args.out, size=args.size, k=args.k, repeats=args.repeats, warmup=args.warmup,
                                    processes=tuple(args.processes))
    print(format_scaling_table(records))
    print(f"wrote {Path(args.out) / 'scaling.json'}, scaling.png")
    return 0
