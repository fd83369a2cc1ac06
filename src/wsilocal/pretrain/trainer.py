"""``wsilocal pretrain``: the loop that pretrains the trunk, its checkpoints and its outputs.

Files in the output folder:

    OUT/config.yaml            the resolved PretrainConfig
    OUT/tile_index.npz         where the tissue tiles of every slide are (scanned once, reused on resume)
    OUT/checkpoint.pt          model, optimizer, step and loss history (every ``checkpoint_every`` steps and on
                               Ctrl-C; removed when the run is done: it only serves to continue)
    OUT/pretrain_log.csv       step, loss, learning rate, tiles/s
    OUT/loss_curve.png         the loss over steps
    OUT/resnet34.safetensors   the result: a torchvision state dict of the arch (resnet18/resnet50.safetensors for
                               those; conv1 stride 2 in torchvision, any stride in our trunk: the weights are the
                               same), fc left out
    OUT/pretrain.json          every setting, the slides used and skipped, times, the final loss, the weights' SHA-256

Every step's tiles and augmentations come from random streams seeded by ``(seed, step, rank)``, never from a
stream that runs on across steps, so ``--resume`` from any checkpoint ends with the same weights as an
uninterrupted run. Under torchrun each rank draws its own tiles and DDP averages the gradients; rank 0 writes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from wsilocal.atomic import atomic_output, check_writable_folder, write_text_atomic
from wsilocal.config import IMAGENET_MEAN, IMAGENET_STD, PretrainConfig, config_from_dict, save_config
from wsilocal.errors import CheckpointError, ConfigError, TrainingInterrupted, WsilocalError
from wsilocal.plotting import pyplot
from wsilocal.pretrain.augment import Augmentation, normalise, two_views
from wsilocal.pretrain.objectives import PretrainNet, objective_loss
from wsilocal.pretrain.tiles import TileIndex, TileSampler, build_tile_index, find_slide_files

log = logging.getLogger(__name__)

WEIGHTS_FILE = "resnet34.safetensors"  # the default arch's; weights_file_name(arch) in general
SUMMARY_FILE = "pretrain.json"
CHECKPOINT_FILE = "checkpoint.pt"
INDEX_FILE = "tile_index.npz"
AUGMENT_STREAM = 0x4155  # "AU": the purpose of the per-step stream of view augmentations
BN_STREAM = 0x424E  # "BN": the tiles that re-estimate the BatchNorm statistics
# Fields that change how a run executes, not what it computes: a resumed run may set them differently.
EXECUTION_FIELDS = ("out", "device", "threads", "workers", "checkpoint_every")


@dataclass
class PretrainResult:
    """What a pretraining run produced: its folder, the weights file and the summary written beside it."""

    out: Path
    weights: Path
    summary: dict = field(default_factory=dict)


def slide_paths(config: PretrainConfig) -> list[Path]:
    """The slide files a config names: its cohort's train and val slides (and test with ``include_test``) and
    the files of ``slides``, each once. Labels are never read."""
    from wsilocal.slide.cohort import load_cohort

    paths: list[Path] = []
    if config.cohort:
        cohort = load_cohort(config.cohort, check_files=False)
        splits = ("train", "val", "test") if config.include_test else ("train", "val")
        paths += [s.path for s in cohort.slides if s.split in splits]
    if config.slides:
        paths += find_slide_files(config.slides)
    unique = list(dict.fromkeys(Path(p).resolve() for p in paths))
    if not unique:
        raise WsilocalError(f"{config.cohort or config.slides}: no slide to pretrain on")
    return unique


@torch.no_grad()
def reestimate_batchnorm(trunk: torch.nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Replace the running statistics of every BatchNorm of ``trunk`` by the exact mean and variance (a cumulative
    average) over ``batches`` of normalised inputs; the trunk is left in eval mode."""
    batchnorms = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over all batches
    trunk.train()
    try:
        for x in batches:
            trunk(x)
    finally:
        for bn in batchnorms:
            bn.momentum = 0.1
        trunk.eval()


class WarmupCosine(Protocol):
    """What :func:`learning_rate` reads of a config (a PretrainConfig or a proxy pretraining's ProxyConfig)."""

    lr: float
    steps: int

    @property
    def warmup_steps(self) -> int: ...


def learning_rate(config: WarmupCosine, step: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then a half cosine to 0 at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seeded_generator(*words: int) -> torch.Generator:
    """A CPU torch generator seeded from a tuple of integers (independent streams for distinct tuples)."""
    seed = int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.Generator().manual_seed(seed)


def weights_file_name(arch: str) -> str:
    """The result's file name in the output folder: ``<arch>.safetensors``."""
    return f"{arch}.safetensors"


def _signature(config: PretrainConfig, *, cohort_by_path: bool = False) -> dict:
    """What a checkpoint (or a finished run) must agree on with the config that resumes (or reuses) it. ``arch``
    is left out at its default, so runs made before it existed (all resnet34) still match. The cohort CSV is named
    by its content, not its path (``cohort_by_path``: by its path, as runs before 2026-12-07 were): a cohort folder
    moved, copied or hard-linked elsewhere, its slides given relative to it, is the same data."""
    signature = {k: v for k, v in asdict(config).items() if k not in EXECUTION_FIELDS}
    if signature["arch"] == PretrainConfig.arch:
        del signature["arch"]
    if config.cohort and not cohort_by_path and Path(config.cohort).is_file():
        signature["cohort"] = "sha256:" + hashlib.sha256(Path(config.cohort).read_bytes()).hexdigest()
    return json.loads(json.dumps(signature))  # as it reads back from JSON (tuples become lists)


def _same_settings(saved: dict | None, config: PretrainConfig) -> bool:
    """Whether a saved signature is ``config``'s, by the cohort's content or (older runs) by its path."""
    return saved in (_signature(config), _signature(config, cohort_by_path=True))


def _optimizer(net: torch.nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW; BatchNorm parameters and biases are not decayed (as is usual for self-supervised ResNets)."""
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def finished_pretraining(out: str | Path, config: PretrainConfig | None = None) -> dict | None:
    """The summary of a finished run in ``out`` (and, given ``config``, one with the same settings), else None."""
    out = Path(out)
    summary_file = out / SUMMARY_FILE
    if not summary_file.is_file():
        return None
    summary = json.loads(summary_file.read_text())
    if not (out / str(summary.get("weights", WEIGHTS_FILE))).is_file():
        return None
    if config is not None and not _same_settings(summary.get("signature"), config):
        return None
    return summary


def load_pretrain_config(out: str | Path, overrides: dict | None = None) -> PretrainConfig:
    """The config saved in a pretraining folder (for ``--resume``), with execution settings overridden."""
    import yaml

    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise WsilocalError(f"{out}: cannot resume, no config.yaml in it")
    values = yaml.safe_load(path.read_text()) or {}
    changed = sorted(k for k in (overrides or {}) if k not in EXECUTION_FIELDS and overrides[k] != values.get(k))
    if changed:
        raise ConfigError(f"{out}: a resumed run keeps its settings; cannot change {', '.join(changed)} "
                          "(start a new --out instead)")
    return config_from_dict({**values, **(overrides or {}), "out": str(out)}, PretrainConfig).validate()


def pretrain(config: PretrainConfig, *, resume: bool = False, progress: bool = True,
             stop_at: int | None = None) -> PretrainResult:
    """Pretrain the trunk as ``config`` says and write the outputs listed in the module docstring.

    Args:
        resume: continue from ``OUT/checkpoint.pt``; without it an ``OUT`` that holds a run is refused.
        stop_at: stop after this step with a checkpoint, as Ctrl-C does (for tests and time-boxed sessions).

    Raises:
        TrainingInterrupted: Ctrl-C (or ``stop_at``) stopped the run after saving a checkpoint.
        WsilocalError: bad input (no usable slide, unwritable folder, checkpoint of another run, ...).
    """
    from wsilocal.runtime import resolve_device
    from wsilocal.train.distributed import distributed_session

    config.validate()
    out = Path(config.out)
    if config.threads:
        torch.set_num_threads(config.threads)
    with distributed_session(resolve_device(config.device)) as ctx:
        if ctx.is_main:
            check_writable_folder(out, "pretraining output")
            done = finished_pretraining(out, config)
            if done is None and not resume and (out / CHECKPOINT_FILE).exists():
                raise WsilocalError(f"{out}: holds an unfinished pretraining run; continue it with "
                                    f"`wsilocal pretrain --resume {out}` or choose another --out")
            if done is None and finished_pretraining(out) is not None:
                raise WsilocalError(f"{out}: holds a finished pretraining with other settings; choose another --out")
            save_config(config, out / "config.yaml")
        else:
            done = None
        done = ctx.on_main(lambda: done)
        if done is not None:
            return PretrainResult(out, out / weights_file_name(config.arch), done)
        index = ctx.on_main(lambda: _tile_index(config, out, progress))
        if ctx.is_main and index.skipped:
            for path, reason in index.skipped.items():
                tqdm.write(f"skipped {path}: {reason}")
        return _Run(config, ctx, index, resume, progress, stop_at).run()


def _tile_index(config: PretrainConfig, out: Path, progress: bool) -> TileIndex:
    """The tile index of the run: reused from ``OUT`` when it was built for the same slides and tiles."""
    paths = slide_paths(config)
    key = hashlib.sha256(json.dumps([[str(p) for p in paths], config.mpp, config.tile, config.min_tissue,
                                     config.assume_mpp]).encode()).hexdigest()
    path = out / INDEX_FILE
    key_file = out / (INDEX_FILE + ".key")
    if path.is_file() and key_file.is_file() and key_file.read_text() == key:
        return TileIndex.load(path)
    index = build_tile_index(paths, mpp=config.mpp, tile=config.tile, min_tissue=config.min_tissue,
                             assume_mpp=config.assume_mpp, progress=progress)
    if not index.paths:
        reasons = "; ".join(f"{p}: {r}" for p, r in list(index.skipped.items())[:3])
        raise WsilocalError(f"pretrain: none of the {len(paths)} slide(s) gives tissue tiles ({reasons})")
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            index.save(handle)
    write_text_atomic(key_file, key)
    return index


class _Run:
    """One pretraining run on this rank (built by :func:`pretrain`)."""

    def __init__(self, config: PretrainConfig, ctx, index: TileIndex, resume: bool, progress: bool,
                 stop_at: int | None):
        self.config, self.ctx, self.index, self.progress, self.stop_at = config, ctx, index, progress, stop_at
        self.out = Path(config.out)
        self.aug = Augmentation(crop=config.crop, crop_scale=(config.crop_scale_min, 1.0),
                                stain_jitter=config.stain_jitter, colour_jitter=config.colour_jitter,
                                blur=config.blur)
        with torch.random.fork_rng(devices=[]):  # the initial weights are the seed's, the caller's RNG untouched
            torch.manual_seed(config.seed)
            self.net = PretrainNet(config.objective, tuple(config.projector_dims), config.arch).to(ctx.device)
        self.optimizer = _optimizer(self.net, config)
        self.step, self.history, self.seconds, self.cpu_seconds = 0, [], 0.0, 0.0
        if resume:
            self._load_checkpoint()
        ctx.broadcast_module(self.net)
        self.model = self.net
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(
                self.net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

    def _load_checkpoint(self) -> None:
        from wsilocal.train.checkpoint import load_checkpoint, load_model_state

        path = self.out / CHECKPOINT_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: no checkpoint to resume from")
        state = load_checkpoint(path)
        if not _same_settings(state.get("signature"), self.config):
            raise CheckpointError(f"{path}: checkpoint of a pretraining run with other settings")
        load_model_state(self.net, state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = int(state["step"]), list(state["history"])
        self.seconds, self.cpu_seconds = float(state["seconds"]), float(state["cpu_seconds"])

    def _save_checkpoint(self) -> None:
        from wsilocal.train.checkpoint import save_checkpoint

        if self.ctx.is_main:
            save_checkpoint({"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                             "step": self.step, "history": self.history, "seconds": self.seconds,
                             "cpu_seconds": self.cpu_seconds,
                             "signature": _signature(self.config)}, self.out / CHECKPOINT_FILE)

    def train_step(self, tiles: np.ndarray) -> float:
        """One optimizer step on a batch of uint8 tiles; returns the loss."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, self.step)
        gen = seeded_generator(config.seed, AUGMENT_STREAM, self.step, self.ctx.rank)
        view1, view2 = two_views(torch.from_numpy(tiles).to(self.ctx.device), self.aug, gen)
        self.model.train()
        # Both views in one forward: one BatchNorm batch and one DDP forward per backward.
        z1, z2 = self.model(torch.cat([view1, view2])).chunk(2)
        loss = objective_loss(config.objective, z1, z2, config.temperature)
        if not torch.isfinite(loss):
            raise WsilocalError(f"pretrain: the loss became {loss.item()} at step {self.step}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def run(self) -> PretrainResult:
        from wsilocal.train.loop import stop_on_interrupt

        config, ctx = self.config, self.ctx
        sampler = TileSampler(self.index, mpp=config.mpp, tile=config.tile, batch_size=config.batch_size,
                              seed=config.seed, rank=ctx.rank, workers=config.workers, assume_mpp=config.assume_mpp)
        stop = threading.Event()
        last = min(config.steps, self.stop_at) if self.stop_at is not None else config.steps
        bar = tqdm(total=config.steps, initial=self.step, desc=f"pretrain {config.objective}", unit="step",
                   disable=not (self.progress and ctx.is_main), dynamic_ncols=True)
        try:
            with stop_on_interrupt(stop, lambda: True):
                while self.step < last:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    sampler.prefetch(self.step + 1)
                    loss = self.train_step(sampler.batch(self.step))
                    seconds = time.perf_counter() - started
                    self.seconds += seconds
                    self.cpu_seconds += time.process_time() - cpu_started
                    rate = config.batch_size * ctx.world_size / seconds
                    self.history.append([self.step, loss, learning_rate(config, self.step), rate])
                    self.step += 1
                    bar.update()
                    bar.set_postfix(loss=f"{loss:.3f}", tiles_per_s=f"{rate:.0f}")
                    interrupted = ctx.on_main(lambda: stop.is_set())
                    if self.step % config.checkpoint_every == 0 or interrupted or self.step == last:
                        self._save_checkpoint()
                    if interrupted:
                        break
            if self.step < config.steps:
                raise TrainingInterrupted(f"pretraining stopped after step {self.step} of {config.steps}, checkpoint "
                                          f"saved; continue with: wsilocal pretrain --resume {self.out}")
            result = self._finish()
        finally:
            bar.close()
            sampler.close()
        return result

    def _reestimate_batchnorm(self) -> None:
        """Replace the running statistics (an average over augmented views) by the exact mean and variance over
        ``bn_tiles`` un-augmented whole tiles: what the weights' users (whole slides, MIL tiles) feed them."""
        if self.config.bn_tiles == 0:
            return
        bn_sampler = TileSampler(self.index, mpp=self.config.mpp, tile=self.config.tile,
                                 batch_size=min(self.config.batch_size, self.config.bn_tiles),
                                 seed=self.config.seed, rank=BN_STREAM, workers=self.config.workers,
                                 assume_mpp=self.config.assume_mpp)

        def batches():
            seen, batch = 0, 0
            while seen < self.config.bn_tiles:
                tiles = torch.from_numpy(bn_sampler.batch(batch)).to(self.ctx.device)
                yield normalise(tiles.permute(0, 3, 1, 2).float().div_(255))
                seen += len(tiles)
                batch += 1

        try:
            reestimate_batchnorm(self.net.trunk, batches())
        finally:
            bn_sampler.close()

    def _finish(self) -> PretrainResult:
        out = self.out
        summary: dict = {}
        if self.ctx.is_main:
            self._reestimate_batchnorm()
            weights = {k: v.detach().cpu().contiguous() for k, v in self.net.trunk.state_dict().items()}
            with atomic_output(out / weights_file_name(self.config.arch)) as tmp:
                save_file(weights, str(tmp), metadata={"format": f"torchvision {self.config.arch} (no fc)",
                                                       "producer": "wsilocal pretrain"})
            summary = self._summary()
            self._write_log()
            write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1))
            (out / CHECKPOINT_FILE).unlink(missing_ok=True)  # only needed to continue; the run is done
        summary = self.ctx.on_main(lambda: summary)
        return PretrainResult(out, out / weights_file_name(self.config.arch), summary)

    def _summary(self) -> dict:
        config, losses = self.config, [h[1] for h in self.history]
        tail = losses[-max(1, len(losses) // 20):]
        return {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": asdict(config), "signature": _signature(config),
            "weights": weights_file_name(config.arch),
            "weights_sha256": hashlib.sha256((self.out / weights_file_name(config.arch)).read_bytes()).hexdigest(),
            "normalisation": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                              "note": "ImageNet's, as torchvision-layout weights expect"},
            "steps": self.step, "tiles_seen": self.step * config.batch_size * self.ctx.world_size,
            "processes": self.ctx.world_size, "device": str(self.ctx.device),
            "train_seconds": round(self.seconds, 1), "cpu_seconds": round(self.cpu_seconds, 1),
            "first_loss": losses[0] if losses else None,
            "final_loss": float(np.mean(tail)) if tail else None,
            "slides": len(self.index.paths), "tiles_indexed": self.index.n_tiles,
            "skipped": self.index.skipped, "torch": torch.__version__,
        }

    def _write_log(self) -> None:
        path = self.out / "pretrain_log.csv"
        with atomic_output(path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "loss", "lr", "tiles_per_s"])
            writer.writerows(self.history)
        plot_loss_curve(self.history, self.out / "loss_curve.png", title=f"pretraining ({self.config.objective})")


def plot_loss_curve(history: list[list[float]], path: Path, title: str) -> None:
    """The loss per step (faint) and its running mean over 5 % of the steps, with the learning rate."""
    plt = pyplot()

    steps = np.array([h[0] for h in history])
    loss = np.array([h[1] for h in history])
    window = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="loss per step")
    ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"running mean ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [h[2] for h in history], color="tab:gray", linestyle="--", linewidth=0.8, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
