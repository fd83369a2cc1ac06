"""``wsilocal bench memory``: the paper's memory table (Table 2), measured three ways on the real step.

For every input size, number of modules K and *variant* (how the step is computed) one training step of
:func:`~wsilocal.train.local_step.local_training_step` on a random image is measured:

1. **saved bytes** — peak bytes of tensors autograd saves for backward (:class:`SavedTensorMeter` around
   the step), with the peak of each module and, per module, *what* is saved (conv inputs, ReLU outputs,
   BatchNorm inputs, RFR decoder, ...). Deterministic: the same on every machine.
2. **peak RSS** — high-water mark of a fresh subprocess that builds the model and runs that one step
   (plus its RSS after building the model, so the step's own increment is visible).
3. **CUDA** — ``torch.cuda.max_memory_allocated`` of that step when the subprocess has a GPU.

**Streaming** rows (variant ``streaming``; methods ``streaming_e2e`` = StreamingCNN at K=1 and
``streaming_local`` at K>1, see :mod:`wsilocal.train.streaming`) run the same network streamed tile by tile,
x_i in a memory-mapped store on CPU (host memory on a GPU), on a procedural image that costs no memory, so
they also run at ``streaming_sizes`` where the plain step would not fit. Peak RSS is *anonymous* memory
(``RssAnon``, sampled by a thread: the kernel keeps no high-water mark of it) in every row: it leaves out the
shared libraries and the page-cache pages of the store, which the kernel can evict.

Step times are measured in one more subprocess per size that holds every variant's model and steps them
in interleaved rounds after a warm-up round (median per variant): the machines are shared and noisy, so
only ratios between numbers from the same rounds mean much. Ratios are taken against K=1 of the same
variant and against the *paper-style* K=1 (BatchNorm run separately, no recomputation) at the same size.

Each measurement runs in a child process (``python -m wsilocal.bench.memory SPEC``), one at a time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsilocal.bench import log_progress
from wsilocal.bench.child import run_child
from wsilocal.bench.options import DEFAULT_VARIANTS, VARIANTS, Variant
from wsilocal.errors import ConfigError, WsilocalError
from wsilocal.models.local_net import LocalNet
from wsilocal.models.memory import SavedTensorMeter
from wsilocal.models.resnet import DEFAULT_ARCH, FrozenBatchNorm2d
from wsilocal.models.split import (
    BlockBoundaries,
    CheckpointedSequential,
    block_boundaries,
    module_saved_bytes,
)
from wsilocal.runtime import process_memory_bytes, tune_cpu_allocator
from wsilocal.train.local_step import StepResult, local_training_step
from wsilocal.train.streaming import (
    DEFAULT_TILE,
    resolve_store,
    streaming_end_to_end_step,
    streaming_local_step,
    tiles_for_budget,
)

N_CLASSES = 2
LABEL = 1
SEED = 0
MiB = 2**20

# Table 2 of the paper (GPU memory in GB, TCGA slides; the E2E value at the largest size measured on CPU).
PAPER_TABLE2 = {
    "sizes": [(8698, 7496), (12223, 10057), (23849, 10257)],  # width × height as printed
    "E2E": [17.89, 33.63, 78.14],
    "K=4": [5.35, 9.64, 18.32],
    "K=8": [3.71, 6.47, 11.85],
}
GOAL = {4: 0.15, 8: 0.08}  # saved bytes of K vs paper-style K=1 at the same input (the goal)
DEFAULT_SIZES = ((1024, 1024), (2048, 2048), (4096, 4096))
QUICK_SIZES = ((512, 512), (1024, 1024))


@dataclass(frozen=True)
class StepConfig:
    """Everything a child process needs to rebuild one measured network (hashable: identical networks
    reached by two variants, e.g. ``balanced`` at K=1 and ``folded`` at K=1, are measured once)."""

    height: int
    width: int
    fold_bn: bool
    recompute: bool
    rfr: bool
    boundaries: tuple[int, ...]  # first block of modules 2..K
    streaming: bool = False
    tile: int = DEFAULT_TILE  # streaming only: output block per window, image px ...
    window_bytes: int = 0  # ... or, when > 0, per-module tiles whose windows save about this much
    arch: str = DEFAULT_ARCH  # the trunk: resnet18, resnet34 or resnet50
    store: str = ""  # streaming local learning only: where x_i waits, "disk" or "memory"; "": the device's default

    def build(self, device: str | torch.device = "cpu") -> LocalNet:
        """The network, seeded, in train mode."""
        torch.manual_seed(SEED)
        net = LocalNet(N_CLASSES, BlockBoundaries(self.boundaries), fold_bn=self.fold_bn, rfr=self.rfr,
                       recompute=self.recompute, arch=self.arch).to(device)
        return net.train()

    def image(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The seeded random (1, 3, H, W) input (a normalised image is about standard normal)."""
        image = torch.randn(1, 3, self.height, self.width, generator=torch.Generator().manual_seed(SEED))
        return image.to(device)

    def inputs(self, device: str | torch.device = "cpu") -> torch.Tensor | NoiseSource:
        """What the step reads: the image, or for a streaming step a :class:`NoiseSource` of its size."""
        return NoiseSource(self.height, self.width) if self.streaming else self.image(device)

    def tiles(self, net: LocalNet) -> list[int]:
        """The streaming step's tile per module (measures ``net`` on the meta device for ``window_bytes``)."""
        return tiles_for_budget(net, self.window_bytes) if self.window_bytes else [self.tile] * len(net.stages)

    def store_on(self, device: torch.device) -> str | None:
        """Where a streamed local step (K > 1) keeps x_i on ``device``: ``store``, else training's ``auto`` choice
        (files on CPU, whose pages the kernel can evict, so the peak RSS shows the flat memory streaming is for;
        host memory beside a GPU). None for other steps."""
        if not (self.streaming and self.boundaries):
            return None
        return self.store or resolve_store("auto", device)


class NoiseSource:
    """An ImageSource of any size that costs no memory: about standard-normal noise, tiled with a period that
    no stride of the trunk divides (1021 px), read window by window. Only for measuring: content does not
    change a step's memory or time."""

    PERIOD = 1021

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.pattern = torch.randn(3, self.PERIOD, self.PERIOD, generator=torch.Generator().manual_seed(SEED))

    def read(self, top: int, left: int, height: int, width: int) -> torch.Tensor:
        rows = torch.arange(top, top + height) % self.PERIOD
        cols = torch.arange(left, left + width) % self.PERIOD
        return self.pattern[:, rows][:, :, cols].unsqueeze(0)


def step_config(variant: Variant, k: int, hw: tuple[int, int], rfr: bool = True,
                tile: int = DEFAULT_TILE, window_bytes: int = 0, arch: str = DEFAULT_ARCH,
                store: str = "") -> StepConfig:
    """The network ``variant`` trains with K modules of an ``arch`` trunk at input ``hw`` (a balanced split is
    chosen for it); ``tile``, ``window_bytes`` and ``store`` only matter to the streaming variant (``store`` only
    at K > 1: StreamingCNN keeps no maps between modules)."""
    if variant.balanced:
        # LocalNet itself picks the balanced boundaries, so the benchmark uses exactly what training uses.
        split = LocalNet(N_CLASSES, k, rfr=rfr, input_hw_for_balance=hw, arch=arch).split
    else:
        split = k
    return StepConfig(hw[0], hw[1], variant.fold_bn, variant.recompute, rfr, block_boundaries(split, arch),
                      variant.streaming, tile if variant.streaming else DEFAULT_TILE,
                      window_bytes if variant.streaming else 0, arch, store if variant.streaming and k > 1 else "")


# --- saved bytes of one real step, per module and per kind of tensor ------------------------------------

_TRUNK_KINDS = {
    nn.ReLU: "trunk ReLU outputs",  # also the next conv's input: counted here, once
    nn.Conv2d: "trunk conv inputs",
    FrozenBatchNorm2d: "trunk BatchNorm inputs",
    nn.MaxPool2d: "trunk max-pool",
    CheckpointedSequential: "trunk block inputs kept for recomputation",
}
OTHER_TRUNK = "trunk other (folded-BatchNorm scales)"
LEFT_OVER = "left over from earlier modules"
OUTSIDE = "losses outside modules"
KIND_ORDER = [LEFT_OVER, *_TRUNK_KINDS.values(), OTHER_TRUNK, "auxiliary classifiers", "RFR decoders",
              "final classifier H", OUTSIDE]


def _kind_of_modules(net: LocalNet) -> dict[nn.Module, str]:
    """The kind each module's *own* saved tensors are reported as (children are reported separately)."""
    kinds = {}
    for stage in net.stages:
        for module in stage.modules():
            kinds[module] = _TRUNK_KINDS.get(type(module), OTHER_TRUNK)
    for aux in net.aux:
        kinds.update((module, "auxiliary classifiers") for module in aux.modules())
        if aux.rfr is not None:
            kinds.update((module, "RFR decoders") for module in aux.rfr.modules())
    kinds.update((module, "final classifier H") for module in net.head.modules())
    return kinds


@dataclass
class StepMemory:
    """Saved-for-backward bytes of one training step."""

    saved_bytes: int  # peak over the step = the largest module's peak
    per_module_saved_bytes: list[int]
    per_module_breakdown: list[dict[str, int]]  # kind → bytes at that module's peak
    left_over_bytes: int  # still saved after the step (0: every graph was freed)


def measure_step_memory(net: LocalNet, image: torch.Tensor, label: int = LABEL) -> StepMemory:
    """Run one :func:`local_training_step` under a :class:`SavedTensorMeter` and attribute what is saved.

    Forward hooks note the meter's bytes around every module call; a module's own bytes (not its
    children's) go to its kind. Each module's graph is freed before the next one starts, so the meter is
    reset at each module's start to read per-module peaks. ``OUTSIDE`` is the rest of a module's peak: the
    loss computed in the step itself.
    """
    kinds = _kind_of_modules(net)
    meter = SavedTensorMeter()
    stack: list[list[Any]] = []  # [module, bytes at entry, bytes of children]
    peaks: list[int] = []
    breakdowns: list[defaultdict[str, int]] = []

    def enter(module: nn.Module, _args: Any) -> None:
        stack.append([module, meter.current, 0])

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:
        module, start, children = stack.pop()
        delta = meter.current - start
        breakdowns[-1][kinds[module]] += delta - children
        if stack:
            stack[-1][2] += delta

    def close_module() -> None:
        peaks.append(meter.peak)
        breakdowns[-1][OUTSIDE] = meter.peak - sum(breakdowns[-1].values())

    def start_module(_module: nn.Module, _args: Any) -> None:
        if breakdowns:
            close_module()
        meter.reset()
        breakdowns.append(defaultdict(int, {LEFT_OVER: meter.current}))

    # Stage hooks first, so a stage's start is registered before its own entry in the stack.
    handles = [stage.register_forward_pre_hook(start_module) for stage in net.stages]
    for module in kinds:
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        with meter:
            local_training_step(net, image, label, generator=torch.Generator().manual_seed(SEED))
        close_module()
    finally:
        for handle in handles:
            handle.remove()
    ordered = [{kind: b[kind] for kind in KIND_ORDER if b.get(kind)} for b in breakdowns]
    return StepMemory(max(peaks), peaks, ordered, meter.current)


def recompute_bound_bytes(net: LocalNet, per_module: Sequence[int], hw: tuple[int, int]) -> int:
    """Upper bound of what backward holds with recomputation: a module's saved bytes plus the largest of its
    blocks re-run at once (what that block saves without recomputation; shapes on the meta device)."""
    block_bytes = module_saved_bytes(net.trunk, BlockBoundaries(tuple(range(1, net.trunk.arch.n_blocks))), hw)
    return max(saved + max(block_bytes[spec.first_block:spec.stop_block])
               for saved, spec in zip(per_module, net.specs, strict=True))


def run_step(net: LocalNet, config: StepConfig, inputs: torch.Tensor | NoiseSource, tiles: list[int] | None = None,
             on_module_backward: Any = None) -> StepResult:
    """The training step ``config`` describes, on ``inputs`` (:meth:`StepConfig.inputs`); a streaming step
    with ``tiles`` (:meth:`StepConfig.tiles`)."""
    generator = torch.Generator().manual_seed(SEED)
    if not config.streaming:
        return local_training_step(net, inputs, LABEL, generator=generator, on_module_backward=on_module_backward)
    tiles = tiles or config.tiles(net)
    if len(net.stages) == 1:
        return streaming_end_to_end_step(net, inputs, LABEL, tile=tiles[0], on_module_backward=on_module_backward)
    store = config.store_on(next(net.parameters()).device)
    return streaming_local_step(net, inputs, LABEL, tile=tiles, store=store, generator=generator,
                                on_module_backward=on_module_backward)


def measure_streaming_memory(net: LocalNet, config: StepConfig, source: NoiseSource) -> StepMemory:
    """Saved-for-backward bytes of one streaming step: the peak of each module (between the ends of two
    modules' backwards; at K=1 the whole step). Window graphs come and go, so no breakdown by kind."""
    tiles = config.tiles(net)  # before metering: it builds graphs on the meta device
    meter = SavedTensorMeter()
    peaks: list[int] = []

    def close_module(_index: int) -> None:
        peaks.append(meter.peak)
        meter.reset()

    with meter:
        run_step(net, config, source, tiles, on_module_backward=close_module)
    return StepMemory(max(peaks), peaks, [{} for _ in peaks], meter.current)


# --- child processes ----------------------------------------------------------------------------------


class AnonPeak:
    """Peak ``RssAnon`` of this process while the context is open, sampled every ``interval`` seconds by a
    thread (convolutions release the GIL, so it samples during them too) and once more on exit."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, process_memory_bytes("RssAnon"))
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, process_memory_bytes("RssAnon"))


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _timed_step(net: LocalNet, config: StepConfig, inputs: torch.Tensor | NoiseSource,
                tiles: list[int]) -> float:
    cuda = next(net.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    run_step(net, config, inputs, tiles)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    net.zero_grad(set_to_none=True)  # frees the gradients: every step allocates its own, as the first did
    return seconds


def _child_memory(config: StepConfig) -> dict[str, Any]:
    """In a fresh process: build, measure one step three ways (RSS: anonymous memory, see the module doc)."""
    device = _device()
    with AnonPeak() as anon:
        rss_baseline = process_memory_bytes("RssAnon")
        net, inputs = config.build(device), config.inputs(device)
        rss_model = process_memory_bytes("RssAnon")
        cuda_model = torch.cuda.memory_allocated() if device == "cuda" else None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        memory = (measure_streaming_memory(net, config, inputs) if config.streaming
                  else measure_step_memory(net, inputs))
        seconds = time.perf_counter() - start
    hw = (config.height, config.width)
    return {
        **asdict(memory),
        "recompute_bound_bytes": recompute_bound_bytes(net, memory.per_module_saved_bytes, hw)
        if config.recompute else None,
        "module_labels": [spec.label() for spec in net.specs],
        "rss_baseline_bytes": rss_baseline,
        "rss_model_bytes": rss_model,
        "peak_rss_bytes": anon.peak,
        "peak_vm_hwm_bytes": process_memory_bytes("VmHWM"),
        "cuda_model_bytes": cuda_model,
        "cuda_max_allocated": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "first_step_seconds": seconds,
        "tiles": config.tiles(net) if config.streaming else None,
        "store": config.store_on(torch.device(device)),
        "device": device,
        "threads": torch.get_num_threads(),
    }


def _child_time(configs: list[StepConfig], repeats: int) -> list[list[float]]:
    """In a fresh process: one warm-up round, then ``repeats`` rounds stepping every network once, the
    order rotated each round so that no variant always runs first or last. Step times per config."""
    device = _device()
    nets = [config.build(device) for config in configs]
    tiles = [config.tiles(net) for config, net in zip(configs, nets, strict=True)]
    # All configs of one call share the size: one image for the plain steps, one source for streaming ones.
    inputs = {streaming: next(c for c in configs if c.streaming == streaming).inputs(device)
              for streaming in {c.streaming for c in configs}}
    times: list[list[float]] = [[] for _ in configs]
    for round_index in range(repeats + 1):
        shift = round_index % len(configs)
        for i in list(range(shift, len(configs))) + list(range(shift)):
            seconds = _timed_step(nets[i], configs[i], inputs[configs[i].streaming], tiles[i])
            if round_index > 0:
                times[i].append(seconds)
    return times


def _child_main(spec: dict[str, Any]) -> Any:
    tune_cpu_allocator()  # time steps the way the trainer runs them
    configs = [StepConfig(**{**c, "boundaries": tuple(c["boundaries"])}) for c in spec["configs"]]
    if spec["mode"] == "memory":
        return _child_memory(configs[0])
    return _child_time(configs, spec["repeats"])


def _measure(spec: dict[str, Any]) -> Any:
    """One measurement of this benchmark in a fresh interpreter (:func:`~wsilocal.bench.child.run_child`)."""
    return run_child("wsilocal.bench.memory", spec)


# --- the benchmark --------------------------------------------------------------------------------------


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def run_memory_benchmark(
    out_dir: str | Path,
    *,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    ks: Sequence[int] = (1, 2, 4, 8),
    variants: Sequence[str] = DEFAULT_VARIANTS,
    repeats: int = 2,
    rfr: bool = True,
    streaming_sizes: Sequence[tuple[int, int]] = (),
    tile: int = DEFAULT_TILE,
    window_bytes: int = 0,
    progress: bool = True,
    arch: str = DEFAULT_ARCH,
    stream_store: str = "",
) -> list[dict[str, Any]]:
    """Measure every (size, K, variant); write ``memory.json``, ``.md`` and ``.png`` in ``out_dir``.

    Args:
        sizes: input sizes as (height, width).
        ks: numbers of modules (K=1 is always measured too: the ratios need it).
        variants: names from :data:`~wsilocal.bench.options.VARIANTS`; the paper-style K=1 is always measured at
            every size.
        repeats: timed steps per network after the warm-up round; 0 skips timing.
        rfr: with the RFR decoders (the method) or without (the paper's ablation).
        streaming_sizes: further sizes at which only the ``streaming`` variant runs (where the plain step
            would not fit); it is added to ``variants`` if missing.
        tile: output block per window of the streaming steps, image px, for every module; or
        window_bytes: when > 0, per-module tiles whose windows save about this much for backward
            (:func:`~wsilocal.train.streaming.tiles_for_budget`).
        progress: print one line per measurement on stderr.
        arch: the trunk, ``resnet18``, ``resnet34`` (the paper's) or ``resnet50``; ratios are within it.
        stream_store: where streamed local steps keep x_i: ``disk`` (memory-mapped files), ``memory`` (host
            memory, counted in the peak RSS), or ``""`` for :meth:`StepConfig.store_on`'s default.

    Returns one record (dict) per size, K and variant; see ``docs/benchmarks.md`` for the keys.
    """
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        raise ConfigError(f"bench memory: unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    if repeats < 0:
        raise ConfigError(f"bench memory: repeats must be >= 0, got {repeats}")
    if stream_store not in ("", "disk", "memory"):
        raise ConfigError(f"bench memory: stream_store must be 'disk' or 'memory', got {stream_store!r}")
    ks = sorted(set(ks) | {1})
    if streaming_sizes and "streaming" not in variants:
        variants = [*variants, "streaming"]
    names = ["paper"] + [name for name in variants if name != "paper"]
    streaming_only = [tuple(hw) for hw in streaming_sizes if tuple(hw) not in {tuple(s) for s in sizes}]
    plan = []  # (variant, k, size, config): sizes outermost, then K, so that variants of a K run together
    for hw in [tuple(hw) for hw in sizes] + streaming_only:
        chosen = ["streaming"] if hw in streaming_only else names
        for k in ks:
            plan += [(VARIANTS[name], k, hw, step_config(VARIANTS[name], k, hw, rfr, tile, window_bytes, arch,
                                                           stream_store))
                     for name in chosen if name in variants or k == 1 or hw in streaming_only]
    configs = list(dict.fromkeys(config for *_, config in plan))

    measured: dict[StepConfig, dict[str, Any]] = {}
    started = time.perf_counter()
    for index, config in enumerate(configs, start=1):
        label = " / ".join(f"{v.name} K={k}" for v, k, _, c in plan if c == config)
        try:
            measured[config] = _measure({"mode": "memory", "configs": [asdict(config)]})
            m = measured[config]
            log_progress(progress, f"[{index}/{len(configs)}] {config.width}x{config.height} {label}: saved "
                                   f"{m['saved_bytes'] / MiB:.0f} MiB, peak RSS {m['peak_rss_bytes'] / MiB:.0f} MiB, "
                                   f"step {m['first_step_seconds']:.1f} s  ({time.perf_counter() - started:.0f} s)")
        except WsilocalError as exc:
            measured[config] = {"error": str(exc)}
            log_progress(progress, f"[{index}/{len(configs)}] {config.width}x{config.height} {label}: FAILED: {exc}")

    write_memory_report(_records(plan, measured, {}, streaming_only), out_dir, started=started)  # if timing fails
    step_times: dict[StepConfig, list[float]] = {}
    for hw in dict.fromkeys(hw for _, _, hw, _ in plan):
        timed = [c for c in configs if (c.height, c.width) == hw and "error" not in measured[c]]
        # At the streaming-only sizes a step takes minutes and there is no plain step to compare with: the
        # memory run's one step is the step time there, which spares two more steps per network.
        if repeats == 0 or not timed or hw in streaming_only:
            continue
        log_progress(progress, f"timing {hw[1]}x{hw[0]}: {len(timed)} networks, 1 warm-up + {repeats} rounds")
        try:
            step_times.update(zip(timed, _measure({"mode": "time", "configs": [asdict(c) for c in timed],
                                                     "repeats": repeats}), strict=True))
        except WsilocalError as exc:
            log_progress(progress, f"timing {hw[1]}x{hw[0]} FAILED: {exc}")

    records = _records(plan, measured, step_times, streaming_only)
    write_memory_report(records, out_dir, started=started)
    return records


def _records(plan: list, measured: dict[StepConfig, dict[str, Any]], step_times: dict[StepConfig, list[float]],
             first_step_sizes: Sequence[tuple[int, int]] = ()) -> list[dict[str, Any]]:
    """One record per planned row; at ``first_step_sizes`` the step time is the memory run's single step."""
    records = []
    for variant, k, hw, config in plan:
        m = measured[config]
        times = step_times.get(config)
        first_step = hw in first_step_sizes and m.get("first_step_seconds") is not None
        if first_step:
            times = [m["first_step_seconds"]]
        method = "end-to-end" if k == 1 else "local"
        record = {
            "method": f"streaming_{'e2e' if k == 1 else 'local'}" if variant.streaming else method,
            "arch": config.arch, "variant": variant.name, "k": k, "height": hw[0], "width": hw[1],
            "fold_bn": variant.fold_bn,
            "recompute": variant.recompute, "balanced": variant.balanced, "streaming": variant.streaming,
            "tile": (config.tile if not config.window_bytes else None) if variant.streaming else None,
            "window_bytes": config.window_bytes or None, "tiles": m.get("tiles"), "rfr": config.rfr,
            "store": m.get("store"),
            "boundaries": list(config.boundaries),
            "step_seconds": statistics.median(times) if times else None, "step_seconds_all": times,
            "step_timing": "first step" if first_step else ("median after warm-up" if times else None),
            **{key: m.get(key) for key in ("saved_bytes", "per_module_saved_bytes", "per_module_breakdown",
                                           "left_over_bytes", "recompute_bound_bytes", "module_labels",
                                           "rss_baseline_bytes", "rss_model_bytes", "peak_rss_bytes",
                                           "peak_vm_hwm_bytes",
                                           "cuda_model_bytes", "cuda_max_allocated", "first_step_seconds",
                                           "device", "threads", "error")},
        }
        per_module = record["per_module_saved_bytes"]
        record["peak_module"] = per_module.index(max(per_module)) if per_module else None
        records.append(record)

    def find(variant: str, k: int, hw: tuple[int, int]) -> dict[str, Any]:
        key = (variant, k, *hw)
        return next((r for r in records if (r["variant"], r["k"], r["height"], r["width"]) == key), {})

    ratios = (("saved", "saved_bytes"), ("rss", "peak_rss_bytes"), ("time", "step_seconds"))
    for r in records:
        hw = (r["height"], r["width"])
        # Streaming rows also against the plain step of the same network (the folded variant) and, for the goal
        # "nearly flat in slide area", against themselves at the next smaller size.
        references = {"": find(r["variant"], 1, hw), "_paper_style": find("paper", 1, hw)}
        if r["streaming"]:
            references["_nonstreaming"] = find("folded", r["k"], hw)
        for suffix, reference in references.items():
            for short, key in ratios:
                r[f"ratio_{short}{suffix}"] = _ratio(r[key], reference.get(key))
        if r["streaming"]:
            smaller = [o for o in records if (o["variant"], o["k"]) == (r["variant"], r["k"])
                       and o["height"] * o["width"] < hw[0] * hw[1] and not o.get("error")]
            previous = max(smaller, key=lambda o: o["height"] * o["width"], default={})
            r["area_growth"] = _ratio(hw[0] * hw[1], previous["height"] * previous["width"] if previous else None)
            r["rss_growth"] = _ratio(r["peak_rss_bytes"], previous.get("peak_rss_bytes"))
    return records


# --- report ---------------------------------------------------------------------------------------------


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MiB:,.0f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def format_memory_table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: one table row per record, then where the memory goes at the largest size, then the goal."""
    lines = ["| size | arch | variant | K | saved MiB | vs K=1 | vs paper K=1 | peak RSS MiB | step's RSS MiB "
             "| RSS vs paper K=1 | step s | time vs K=1 | time vs paper K=1 | CUDA max MiB |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        arch = r.get("arch", DEFAULT_ARCH)  # records written before the column: resnet34
        if r.get("error"):
            lines.append(f"| {r['width']}×{r['height']} | {arch} | {r['variant']} | {r['k']} | failed: {r['error']} "
                         "| | | | | | | | | |")
            continue
        step = "—" if r["step_seconds"] is None else f"{r['step_seconds']:.2f}"
        lines.append(f"| {r['width']}×{r['height']} | {arch} | {r['variant']} | {r['k']} | {_mib(r['saved_bytes'])} "
                     f"| {_pct(r['ratio_saved'])} | {_pct(r['ratio_saved_paper_style'])} "
                     f"| {_mib(r['peak_rss_bytes'])} | {_mib(r['peak_rss_bytes'] - r['rss_model_bytes'])} "
                     f"| {_pct(r['ratio_rss_paper_style'])} | {step} "
                     f"| {_x(r['ratio_time'])} | {_x(r['ratio_time_paper_style'])} "
                     f"| {_mib(r['cuda_max_allocated'])} |")
    return "\n\n".join(part for part in ("\n".join(lines), format_breakdown(records), format_goal(records),
                                          format_projection(records), format_streaming(records)) if part)


def format_breakdown(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: at the largest size, the peak module of each record and what its saved bytes are."""
    valid = [r for r in records if not r.get("error") and not r.get("streaming")]  # streaming: no breakdown
    if not valid:
        return ""
    largest = max((r["height"] * r["width"], r["height"], r["width"]) for r in valid)[1:]
    rows = [r for r in valid if (r["height"], r["width"]) == largest]
    peaks = [r["per_module_breakdown"][r["peak_module"]] for r in rows]
    kinds = [kind for kind in KIND_ORDER if any(peak.get(kind) for peak in peaks)]
    lines = [f"Where the saved bytes go at {largest[1]}×{largest[0]} (MiB, in the module with the peak):", "",
             "| variant | K | peak module | " + " | ".join(kinds) + " |",
             "|---|---|---|" + "---:|" * len(kinds)]
    for r in rows:
        breakdown = r["per_module_breakdown"][r["peak_module"]]
        label = f"{r['peak_module'] + 1}: {r['module_labels'][r['peak_module']]}"
        lines.append(f"| {r['variant']} | {r['k']} | {label} | "
                     + " | ".join(f"{breakdown.get(kind, 0) / MiB:,.1f}" for kind in kinds) + " |")
    return "\n".join(lines)


def format_goal(records: Sequence[dict[str, Any]]) -> str:
    """Markdown list: per size and goal K, the variants whose saved bytes reach the goal and their time."""
    lines = ["Goal: saved bytes of K=4 ≤ 15 % and of K=8 ≤ 8 % of the paper-style K=1 (the step no slower "
             "than K=1).", ""]
    for hw in dict.fromkeys((r["height"], r["width"]) for r in records):
        for k, goal in GOAL.items():
            rows = [r for r in records
                    if (r["height"], r["width"]) == hw and r["k"] == k and not r.get("error")]
            if not rows:
                continue
            best = min(rows, key=lambda r: r["saved_bytes"])
            reached = [f"{r['variant']} ({_pct(r['ratio_saved_paper_style'])}, time "
                       f"{_x(r['ratio_time_paper_style'])} paper K=1)"
                       for r in rows if r["ratio_saved_paper_style"] is not None
                       and r["ratio_saved_paper_style"] <= goal]
            text = ", ".join(reached) if reached else (f"none; best {best['variant']} at "
                                                      f"{_pct(best['ratio_saved_paper_style'])}")
            lines.append(f"- {hw[1]}×{hw[0]}, K={k} (≤ {goal:.0%}): {text}")
    return "\n".join(lines)


def project_saved_bytes(records: Sequence[dict[str, Any]], area: float) -> dict[tuple[str, int], float]:
    """Saved bytes of each (variant, K) extrapolated to an input of ``area`` pixels.

    Each module's saved bytes are a fixed part (RFR decoders, classifier weights-sized tensors) plus a part
    proportional to the input area; both are fitted per module on the two largest measured sizes and the
    step's peak is the largest module. Balanced variants are left out: their split changes with the size.
    """
    rows: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if not r.get("error") and not r["balanced"] and not r.get("streaming"):  # both: not linear in area
            rows[(r["variant"], r["k"])].append(r)
    projected = {}
    for key, group in rows.items():
        if len(group) < 2:
            continue
        small, large = sorted(group, key=lambda r: r["height"] * r["width"])[-2:]
        a_small, a_large = small["height"] * small["width"], large["height"] * large["width"]
        pairs = zip(small["per_module_saved_bytes"], large["per_module_saved_bytes"], strict=True)
        projected[key] = max(b + (b - a) / (a_large - a_small) * (area - a_large) for a, b in pairs)
    return projected


def format_projection(records: Sequence[dict[str, Any]], tolerance: float = 0.02) -> str:
    """Markdown: saved bytes projected to the paper's Table 2 sizes, beside the paper's GPU numbers.

    Needs three measured sizes: the projection is first checked by fitting without the largest size and
    predicting it. Small inputs clip the RFR patches to the map, so bytes are not yet linear in area there;
    if the check is off by more than ``tolerance``, no projection is shown.
    """
    areas = sorted({r["height"] * r["width"] for r in records if not r.get("error")})
    if len(areas) < 3:
        return ""
    check = project_saved_bytes([r for r in records if r["height"] * r["width"] < areas[-1]], areas[-1])
    errors = [abs(check[(r["variant"], r["k"])] / r["saved_bytes"] - 1) for r in records
              if r["height"] * r["width"] == areas[-1] and (r["variant"], r["k"]) in check]
    projections = [project_saved_bytes(records, w * h) for w, h in PAPER_TABLE2["sizes"]]
    if not errors or max(errors) > tolerance or ("paper", 1) not in projections[0]:
        return "No projection to the paper's sizes: saved bytes are not linear in area over these sizes."
    paper_share = {k: [v / e2e for v, e2e in zip(PAPER_TABLE2[f"K={k}"], PAPER_TABLE2["E2E"], strict=True)]
                   for k in (4, 8)}
    header = " | ".join(f"{w}×{h}" for w, h in PAPER_TABLE2["sizes"])
    lines = ["Saved bytes projected to the paper's input sizes (linear in area per module, fitted on the two "
             "largest measured sizes), as % of paper-style K=1; the paper's rows: GPU memory, TCGA slides.",
             "",
             f"| variant | K | {header} |", "|---|---|---:|---:|---:|",
             "| paper-style K=1 (GiB) | 1 | "
             + " | ".join(f"{p[('paper', 1)] / 2**30:.1f}" for p in projections) + " |"]
    for k in (4, 8):
        lines.append(f"| **paper, Table 2** | {k} | " + " | ".join(_pct(v) for v in paper_share[k]) + " |")
        for variant in [v for v, kk in projections[0] if kk == k]:
            shares = (_pct(p[(variant, k)] / p[("paper", 1)]) for p in projections)
            lines.append(f"| {variant} | {k} | " + " | ".join(shares) + " |")
    lines += ["", "Check: fitted without the largest size, the projection of the largest size is off by "
                  f"at most {100 * max(errors):.1f} % (mean {100 * statistics.mean(errors):.1f} %)."]
    return "\n".join(lines)


STREAMING_GOAL = {"rss_growth": 1.5, "area_growth": 4.0, "time": 1.5}


def format_streaming(records: Sequence[dict[str, Any]]) -> str:
    """Markdown: the streaming rows side by side — StreamingCNN and streaming local learning — against the plain
    step of the same network, and how their peak memory grows with the slide; then the goal's verdicts."""
    rows = [r for r in records if r.get("streaming") and not r.get("error")]
    if not rows:
        return ""
    lines = ["Streaming (exact gradients, tile by tile; peak RSS = anonymous memory: x_i kept in memory-mapped files "
             "(store `disk`) is not in it, x_i kept in memory (store `memory`) is). \"vs plain\": the same network's "
             "non-streaming step at the same size.", "",
             "| size | method | K | store | tile | saved MiB | peak RSS MiB | saved vs plain | RSS vs plain | time s "
             "| time vs plain | vs smaller size: area × / RSS × | RSS vs StreamingCNN | time vs StreamingCNN |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["k"], r["height"] * r["width"])):
        growth = "—" if r["area_growth"] is None else f"{r['area_growth']:.1f} / {r['rss_growth']:.2f}"
        step = "—" if r["step_seconds"] is None else f"{r['step_seconds']:.1f}"
        step += "¹" if r.get("step_timing") == "first step" else ""
        tiles = r["tiles"] or []
        tile = str(tiles[0]) if len(set(tiles)) == 1 else "/".join(map(str, tiles))
        lines.append(f"| {r['width']}×{r['height']} | {r['method']} | {r['k']} | {r.get('store') or '—'} | {tile} "
                     f"| {_mib(r['saved_bytes'])} | {_mib(r['peak_rss_bytes'])} "
                     f"| {_pct(r['ratio_saved_nonstreaming'])} | {_pct(r['ratio_rss_nonstreaming'])} | {step} "
                     f"| {_x(r['ratio_time_nonstreaming'])} "
                     f"| {growth} | {_pct(r['ratio_rss'])} | {_x(r['ratio_time'])} |")
    if any(r.get("step_timing") == "first step" for r in rows):
        lines += ["", "¹ one step, timed in the memory run (no warm-up round): at these sizes only streaming runs."]
    lines += ["", f"Goal of streaming local learning: {STREAMING_GOAL['area_growth']:.0f}× the area costs at most "
                  f"{STREAMING_GOAL['rss_growth']}× the peak memory; a step under {STREAMING_GOAL['time']}× the plain "
                  "step's time.", ""]
    for r in sorted((r for r in rows if r["method"] == "streaming_local"), key=lambda r: (r["k"], r["height"])):
        size = f"{r['width']}×{r['height']}, K={r['k']}"
        if r["rss_growth"] is not None:
            per_4x = r["rss_growth"] ** (math.log(STREAMING_GOAL["area_growth"]) / math.log(r["area_growth"]))
            verdict = "met" if per_4x <= STREAMING_GOAL["rss_growth"] else "NOT met"
            lines.append(f"- {size}: memory ×{r['rss_growth']:.2f} for area ×{r['area_growth']:.1f} "
                         f"(×{per_4x:.2f} per 4× area): {verdict}")
        if r["ratio_time_nonstreaming"] is not None:
            verdict = "met" if r["ratio_time_nonstreaming"] < STREAMING_GOAL["time"] else "NOT met"
            lines.append(f"- {size}: step time {_x(r['ratio_time_nonstreaming'])} the plain step: {verdict}")
    return "\n".join(lines)


def write_memory_report(records: Sequence[dict[str, Any]], out_dir: str | Path, *,
                        started: float | None = None) -> None:
    """Write ``memory.json`` (records + machine), ``memory.md`` (tables) and ``memory.png`` (plots)."""
    from wsilocal.bench.plots import plot_memory

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "seconds": None if started is None else round(time.perf_counter() - started, 1)}
    (out / "memory.json").write_text(json.dumps({"machine": meta, "records": list(records)}, indent=1))
    legend = "\n".join(f"- `{v.name}`: {v.description}" for v in VARIANTS.values()
                       if any(r["variant"] == v.name for r in records))
    (out / "memory.md").write_text(f"# Memory benchmark ({meta['date']}, torch {meta['torch']}, "
                                   f"{meta['cpu_count']} CPUs, GPU: {meta['cuda'] or 'none'})\n\n{legend}\n\n"
                                   + format_memory_table(records) + "\n")
    plot_memory(records, out / "memory.png")


# --- command line -------------------------------------------------------------------------------------


def memory_main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments, print the table and where the files are."""
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    ks = args.k or ((1, 4) if args.quick else (1, 2, 4, 8))
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 2)
    records = run_memory_benchmark(args.out, sizes=sizes, ks=ks, variants=args.variants, repeats=repeats,
                                   rfr=not args.no_rfr, streaming_sizes=args.streaming_sizes, tile=args.tile,
                                   window_bytes=args.window_mib * MiB, arch=args.arch,
                                   stream_store=args.stream_store or "")
    print(format_memory_table(records))
    print(f"wrote {Path(args.out) / 'memory.json'}, memory.md, memory.png")
    return 1 if any(r.get("error") for r in records) else 0


if __name__ == "__main__":  # a measurement child (see bench/child.py)
    print(json.dumps(_child_main(json.loads(sys.argv[1]))))
