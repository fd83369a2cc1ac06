"""The local-learning trainer: cohort → cache → K modules → checkpoints, metrics and curves in a run directory.

The run directory's files are :mod:`wsilocal.run.directory`'s; ``model.json`` holds the class names (index =
position), the input normalisation, the arch, the module boundaries and the trunk's weights file. The epoch loop
(phases, early stopping, the best checkpoint, metrics files, resume) is :mod:`wsilocal.train.loop`'s, shared with
the MIL-baseline trainer; this module gives it the method's phases, epochs and validation.

Schedules. ``simultaneous`` (the authors' code): every step trains all modules, each on its own loss.
``greedy`` (the paper's text): module 1 with its auxiliary model until its validation loss stops improving
(or ``epochs`` pass), then module 2 on the frozen module 1, and so on; the last phase trains module K with
the final classifier. Before the next phase starts, a module and its auxiliary model go back to the weights of
their best validation epoch (``best_by``, scored on the module's auxiliary classifier), and the next module
learns on those. Both are a list of *phases* over which the same epoch loop runs.

Reproducibility: data order, augmentation, RFR locations and dropout draw from streams named by (seed,
purpose, phase and epoch, slide) (:func:`~wsilocal.train.data.stream_seed`: no two names share a stream, across
seeds too), and resume restores model, optimizer, scheduler and counters at an epoch
boundary, so ``--resume`` ends with the same weights as an uninterrupted run. Ctrl-C (SIGINT) finishes the
optimizer step in progress, saves ``checkpoint_last.pt`` mid-epoch (the position in the epoch's order and the
slides' losses so far) and stops with exit code 130; ``--resume`` then continues from the next slide and
still ends with the same weights. A second Ctrl-C stops at once (the last checkpoint stays as it was).

Several processes (``torchrun``, or ``wsilocal train --devices N``; see :mod:`wsilocal.train.distributed`):
rank r trains on the positions ``r, r+N, r+2N, …`` of each epoch's order, gradients are summed over ranks
once per optimizer step, validation predictions are gathered in cohort order, and only rank 0 touches the
run directory. Because every slide's random draws depend on the slide, not on what ran before it, N
processes with accumulation A compute what one process with accumulation N×A computes.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from wsilocal.config import IMAGENET_MEAN, IMAGENET_STD, TrainConfig, save_config
from wsilocal.errors import SlideError, WsilocalError, out_of_memory_as_slide_error
from wsilocal.models.local_net import LocalNet
from wsilocal.models.resnet import LoadedWeights, calibrate_batchnorm, load_trunk_weights
from wsilocal.models.split import BlockBoundaries, block_boundaries
from wsilocal.prepare.cache import PrepareResult, channel_stats, format_summary, prepare_cohort, settings_for
from wsilocal.run.directory import RunDirectory, masks_glass, model_signature
from wsilocal.runtime import memory_budget_bytes, resolve_device, tune_cpu_allocator
from wsilocal.slide.cohort import Cohort, load_cohort
from wsilocal.stream.forward import whole_forward_bytes
from wsilocal.stream.sources import TensorSource
from wsilocal.train.checkpoint import save_checkpoint
from wsilocal.train.data import (
    Augmentation,
    CachedSlides,
    Purpose,
    balanced_class_weights,
    sample_generator,
    stream_seed,
)
from wsilocal.train.distributed import DistContext, GradientAllReduce, distributed_session
from wsilocal.train.local_step import StepResult, forward_all_classifiers, local_training_step
from wsilocal.train.loop import (
    EpochLoop,
    MidEpochStop,
    TrainResult,
    Validation,
    load_resume_state,
    plateau_scheduler,
    refuse_existing_run,
    setup_logging,
    stop_agreed,
    stop_on_interrupt,
    validation_row,
)
from wsilocal.train.metrics import classification_metrics
from wsilocal.train.streaming import (
    DEFAULT_TILE,
    auto_store_memory_bytes,
    resolve_store,
    should_stream,
    streaming_end_to_end_step,
    streaming_forward_all_classifiers,
    streaming_local_step,
)

log = logging.getLogger("wsilocal")

RANDOM_INIT_WARNING = (
    "WARNING: no pretrained weights given (--weights): the trunk is randomly initialised and its "
    "BatchNorm statistics are calibrated on training slides. Expect lower accuracy than with ImageNet weights."
)


def input_normalisation(config: TrainConfig, slides_mean: list[float],
                        slides_std: list[float]) -> tuple[list[float], list[float]]:
    """The per-channel (mean, std) the network's input is normalised with (``config.normalisation``): ImageNet's
    when the trunk starts from a weights file (its frozen stem and BatchNorm statistics were made for that input),
    else the training slides' own (``slides_mean``, ``slides_std``)."""
    if config.normalisation == "imagenet" or (config.normalisation == "auto" and config.weights):
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return list(slides_mean), list(slides_std)


def build_model(config: TrainConfig, n_classes: int, block_boundaries: list[int] | None = None,
                balance_for_hw: tuple[int, int] | None = None) -> LocalNet:
    """The network a config describes (random weights; pretrained trunk loaded by the caller).

    ``block_boundaries`` (saved in a run's ``model.json``) fixes the split exactly; otherwise it comes from
    ``boundaries`` or ``k``, balanced for an input of ``balance_for_hw`` when ``config.balanced``.
    """
    if block_boundaries is not None:
        split = BlockBoundaries(tuple(block_boundaries))
    else:
        split = config.boundaries if config.boundaries is not None else config.k
    return LocalNet(
        n_classes,
        split=split,
        conv1_stride=config.conv1_stride,
        fold_bn=config.fold_bn,
        rfr=config.rfr,
        rfr_patches=config.rfr_patches,
        recompute=config.recompute,
        input_hw_for_balance=balance_for_hw if (config.balanced and block_boundaries is None) else None,
        arch=config.arch,
        head_context=config.head_context,
    )


def _phases(config: TrainConfig, k: int) -> list[range]:
    """Which modules learn in each phase: all at once, or one after another."""
    return [range(0, k)] if config.schedule == "simultaneous" else [range(i, i + 1) for i in range(k)]


def _keeps_best_module(config: TrainConfig, phase: range, k: int) -> bool:
    """Whether this phase's module goes back to its best validation epoch when the phase ends: greedy, before K."""
    return config.schedule == "greedy" and phase.stop < k


def _module_weights(net: LocalNet, i: int) -> dict[str, dict[str, torch.Tensor]]:
    """A copy (on the CPU) of module i's part of the trunk and of its auxiliary model."""
    def copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in module.state_dict().items()}

    return {"stage": copy(net.stages[i]), "aux": copy(net.aux[i])}


def module_parameters(net: LocalNet, i: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Trainable parameters of module i: its part of the trunk, and its auxiliary model (H for the last)."""
    trunk = [p for p in net.stages[i].parameters() if p.requires_grad]
    return trunk, list((net.aux[i] if i < len(net.aux) else net.head).parameters())


def gradient_buckets(net: LocalNet, phase: range) -> dict[int, list[torch.nn.Parameter]]:
    """What distributed training sums across ranks after each module's backward: module i's parameters."""
    return {i: [p for part in module_parameters(net, i) for p in part] for i in phase}


def _phase_parameters(net: LocalNet, phase: range, config: TrainConfig) -> list[dict]:
    parts = [module_parameters(net, i) for i in phase]
    trunk = [p for part, _ in parts for p in part]
    heads = [p for _, part in parts for p in part]
    groups = [{"params": heads, "lr": config.lr_aux}]
    if trunk:
        groups.insert(0, {"params": trunk, "lr": config.lr_trunk})
    return groups


def check_trainable_size(image: torch.Tensor, slide_id: str, source: str, config: TrainConfig) -> None:
    """Refuse a slide too large for memory with advice, instead of cropping it silently."""
    h, w = image.shape[-2:]
    if h * w > config.max_train_pixels:
        raise SlideError(
            source,
            f"slide {slide_id} is {w}×{h} px at {config.mpp} µm/px, more than max_train_pixels "
            f"({config.max_train_pixels:,}); use --streaming (memory bounded by a tile), more modules (--k 8), "
            f"a coarser --mpp, or raise --max-train-pixels if memory allows",
        )


@torch.no_grad()
def evaluate_samples(net: LocalNet, samples: CachedSlides, device: torch.device, upto: int | None = None,
                     progress: bool = False, desc: str = "validate", ctx: DistContext | None = None, *,
                     memory_budget: int | None = None, stream_tile: int = DEFAULT_TILE,
                     stream_store: str = "auto") -> dict:
    """Probabilities of the final classifier (or of module ``upto``'s) and of each auxiliary classifier.

    A slide whose whole-image forward would exceed ``memory_budget`` bytes (None: never) is evaluated streamed
    (:func:`~wsilocal.train.streaming.streaming_forward_all_classifiers`, windows of ``stream_tile`` px, x_i
    where :func:`~wsilocal.train.streaming.resolve_store` puts ``stream_store``): the same probabilities, memory
    bounded by a window. With a distributed ``ctx`` each rank evaluates its share of the slides and every rank
    returns the gathered results in sample order: each slide counted once, as in one process.
    """
    ctx = ctx or DistContext(device=device)
    net.eval()
    records = []  # (sample index, loss, final probabilities, auxiliary probabilities, slide id, streamed)
    for index in tqdm(ctx.shard(range(len(samples))), desc=desc, unit="slide", leave=False, disable=not progress):
        image, label, slide_id = samples.get(index)
        tissue = samples.tissue(index)
        streamed = memory_budget is not None and \
            whole_forward_bytes(net.trunk, *image.shape[-2:]) > memory_budget
        if streamed:
            outputs = streaming_forward_all_classifiers(net, TensorSource(image), upto=upto, tissue=tissue,
                                                        tile=stream_tile, store=resolve_store(stream_store, device))
        else:
            outputs = forward_all_classifiers(net, image.to(device), upto=upto, tissue=tissue)
        logits = outputs[-1]
        records.append((index, float(F.cross_entropy(logits, torch.tensor([label], device=device))),
                        torch.softmax(logits, 1)[0].cpu().numpy(),
                        [torch.softmax(o, 1)[0].cpu().numpy() for o in outputs[:-1]], slide_id, streamed))
    records = sorted((r for part in ctx.gather_objects(records) for r in part), key=lambda r: r[0])
    _, losses, final_probs, aux_probs, ids, streamed = zip(*records, strict=True) if records else ([],) * 6
    return {
        "probabilities": np.array(final_probs),
        "aux_probabilities": list(aux_probs),
        "labels": np.array(samples.labels),
        "loss": float(np.mean(losses)) if losses else math.nan,
        "slide_ids": list(ids),
        "streamed_slides": int(sum(streamed)),
    }


#: Side of the central crop of each slide that BatchNorm calibration sees (see ``Trainer._calibrate``).
CALIBRATION_SIDE = 2048


def _central_crop(image: torch.Tensor, side: int) -> torch.Tensor:
    """The central ``side``×``side`` px of a (..., H, W) image (the whole of a shorter axis)."""
    h, w = image.shape[-2:]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return image[..., top : top + side, left : left + side]


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """The learning-rate schedule of one phase, stepped once per epoch by
    :func:`~wsilocal.train.loop.step_lr_scheduler`."""
    if config.lr_schedule == "cosine":
        # Closed form of the epoch (not CosineAnnealingLR's recursion): a run resumed with more epochs follows
        # the new curve from where it is.
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: 0.5 * (1 + math.cos(math.pi * min(epoch, config.epochs) / config.epochs)))
    return plateau_scheduler(optimizer, config.plateau_factor, config.plateau_patience)


class Trainer:
    """Trains one run directory from a :class:`TrainConfig`; ``run()`` does everything.

    It sets the run up (cohort, cache, network, resume) and runs a :class:`~wsilocal.train.loop.EpochLoop`, to
    which it is the :class:`~wsilocal.train.loop.Phases`: the phases of modules, one epoch of training, validation.
    Under torchrun (or inside a process group the caller started) it is one rank of a distributed run.
    """

    checkpoint_key = "phase"  # checkpoint_last.pt's "phase", "phase_best" (see Phases)

    def __init__(self, config: TrainConfig, progress: bool = True, resume: bool = False):
        self.config = config.validate()
        self.progress = progress
        self.resume = resume
        self.directory = RunDirectory(config.out)
        self.warnings: list[str] = []
        self.ctx = DistContext()
        self.stop_requested = threading.Event()  # set by Ctrl-C (see stop_on_interrupt) or by a caller
        self.training = False  # Ctrl-C saves a checkpoint only once the epochs have started
        self.stream_budget: int | None = None  # bytes a plain training step may use (see _streams)
        self.loaded_weights: LoadedWeights | None = None  # the --weights file, once loaded (for model.json)
        self.module_best: dict | None = None  # greedy: the phase's module at its best validation epoch so far

    # --- set-up (file access on rank 0 only; the results are shared with every rank) -------------
    def _open_run_dir(self) -> dict | None:
        """Check the run directory, start the log; the saved ``model.json`` of an earlier start, if any."""
        refuse_existing_run(self.directory, self.resume)
        setup_logging(self.directory)
        return self.directory.metadata() if self.directory.metadata_file.exists() else None

    def _prepare_data(self, saved_meta: dict | None) -> tuple[Cohort, CachedSlides, CachedSlides, dict[str, str]]:
        config = self.config

        def prepare() -> tuple[Cohort, PrepareResult]:  # rank 0 fills the cache; the others read it
            cohort = load_cohort(config.cohort, classes=saved_meta["classes"] if saved_meta else None,
                                 check_files=config.strict, allow_outside=config.allow_outside_paths)
            result, _ = prepare_cohort(cohort, config.resolved_cache(), settings_for(config), workers=config.workers,
                                       progress=self.progress)
            return cohort, result

        cohort, result = self.ctx.on_main(prepare)
        if result.skipped:
            log.warning("skipped slides:\n%s", format_summary(cohort, result))
            self.warnings.extend(f"skipped {sid}: {why}" for sid, why in result.skipped.items())
        train_slides = [s for s in cohort.split("train") if s.slide_id in result.entries]
        val_slides = [s for s in cohort.split("val") if s.slide_id in result.entries]
        if not train_slides:
            raise WsilocalError(f"{config.cohort}: no training slide could be prepared")
        if not val_slides:
            raise WsilocalError(f"{config.cohort}: no validation slide (split 'val') could be prepared")
        mean, std = input_normalisation(config, *channel_stats(result.entries[s.slide_id] for s in train_slides))
        if saved_meta:  # a resumed run keeps the normalisation it started with
            mean, std = saved_meta["mean"], saved_meta["std"]
        aug = Augmentation(config.augment, config.edge_crop, config.color_jitter)

        # A resumed run keeps the glass masking it started with: runs begun before the mask existed have none.
        self.mask_glass = masks_glass(saved_meta) if self.resume and saved_meta else config.mask_glass

        def samples(slides, augmentation):
            return CachedSlides([result.entries[s.slide_id] for s in slides],
                                [cohort.label_index(s) for s in slides], mean, std, augmentation, config.seed,
                                mask_glass=self.mask_glass)

        self.mean, self.std = mean, std
        return cohort, samples(train_slides, aug), samples(val_slides, None), result.skipped

    def _initialise_trunk(self, net: LocalNet, train: CachedSlides) -> None:
        if self.config.weights:
            self.loaded_weights = load_trunk_weights(net.trunk, self.config.weights)
            log.info("loaded %s trunk weights from %s (sha256 %s, prefix %r, %d keys left out)",
                     net.trunk.arch.title, self.config.weights, self.loaded_weights.sha256,
                     self.loaded_weights.prefix, self.loaded_weights.ignored)
            return
        self.warnings.append(RANDOM_INIT_WARNING)
        log.warning(RANDOM_INIT_WARNING)
        if self.progress:
            tqdm.write(RANDOM_INIT_WARNING)
        self._calibrate(net, train)

    def _calibrate(self, net: LocalNet, train: CachedSlides) -> None:
        """BatchNorm statistics of a random-init trunk from the first training slides (unaugmented), each cut
        to its central ``CALIBRATION_SIDE``² px: calibration holds every image's activations at once, and
        per-channel means and variances need no whole slide."""
        if self.ctx.is_main:  # the other ranks receive these statistics with the weights (broadcast_module)
            n = min(self.config.calibration_slides, len(train))
            images = (_central_crop(train.get(i)[0], CALIBRATION_SIDE).to(self.device) for i in range(n))
            calibrate_batchnorm(net.trunk, images)

    # --- the run ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        if self.resume and not self.directory.holds_run:
            # Killed before its first epoch ended: nothing to continue, so start over (same seed, same run).
            self.resume = False
        tune_cpu_allocator()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        with distributed_session(resolve_device(self.config.device)) as ctx:
            self.ctx, self.device = ctx, ctx.device
            self.progress = self.progress and ctx.is_main
            if not ctx.is_main:
                log.setLevel(logging.ERROR)  # rank 0 logs for everyone
            with stop_on_interrupt(self.stop_requested, armed=lambda: self.training):
                return self._run()

    def _run(self) -> TrainResult:
        config, ctx = self.config, self.ctx
        saved_meta = ctx.on_main(self._open_run_dir)
        cohort, train, val, skipped = self._prepare_data(saved_meta)
        classes = list(cohort.classes)
        signature = model_signature(config, classes)
        saved = saved_meta if self.resume and saved_meta else {}
        largest = max(train.entries, key=lambda e: e.height * e.width)
        torch.manual_seed(config.seed)  # the initial weights of the model are part of the run's seed
        net = build_model(config, len(classes), saved.get("block_boundaries"),
                          balance_for_hw=(largest.height, largest.width)).to(self.device)
        state = None
        if self.resume:
            state = load_resume_state(self.directory, net, signature, ctx)
            self.warnings = state.get("warnings", [])
            self.module_best = state.get("module_best")
        else:
            self._initialise_trunk(net, train)
            if ctx.is_main:
                save_config(config, self.directory.config_file)
                meta = {"classes": classes, "mean": self.mean, "std": self.std, "arch": config.arch,
                        "block_boundaries": list(block_boundaries(net.split, net.trunk.arch)),
                        "weights": self.loaded_weights.record() if self.loaded_weights else None,
                        "mask_glass": self.mask_glass}
                self.directory.write_metadata(meta)
        ctx.broadcast_module(net)  # every rank starts from rank 0's weights and BatchNorm statistics
        self.net, self.train_samples, self.val_samples = net, train, val
        self.classes, self.signature = classes, signature
        self.phases = _phases(config, len(net.stages))
        self.n_phases = len(self.phases)
        self.class_weight = (balanced_class_weights(train.labels, len(classes), self.device) if config.class_weights
                             else None)
        self.training = True  # from here on Ctrl-C stops after the next optimizer step, with a checkpoint
        log.info("model:\n%s", net.describe())
        log.info("train %d slides, validation %d slides, classes %s", len(train), len(val), classes)
        if ctx.distributed:
            log.info("distributed: %d processes (%s), effective batch %d slides per optimizer step = %d processes "
                     "× accumulation %d", ctx.world_size, ctx.device.type, ctx.world_size * config.accumulation,
                     ctx.world_size, config.accumulation)
        loop = EpochLoop(self.directory, self, best_by=config.best_by, early_stopping=config.early_stopping,
                         warnings=self.warnings, resume_hint=f"wsilocal train --resume {self.directory.path}",
                         stop_requested=self.stop_requested, ctx=ctx, progress=self.progress)
        best, history = loop.run(state)
        return loop.finish(best, history, skipped, net.describe(), processes=ctx.world_size,
                           effective_batch=ctx.world_size * config.accumulation)

    # --- the phases of the epoch loop (:class:`~wsilocal.train.loop.Phases`) -------------------------
    def phase_label(self, p: int) -> str:
        return f"phase {p}"

    def phase_epochs(self, p: int) -> int:
        return self.config.epochs

    def start_phase(self, p: int, resumed: bool) -> tuple[torch.optim.Optimizer, object]:
        """The phase's modules learn with AdamW (trunk and auxiliary rates) on the config's schedule."""
        optimizer = torch.optim.AdamW(_phase_parameters(self.net, self.phases[p], self.config),
                                      weight_decay=self.config.weight_decay)
        if not resumed:  # a resumed phase keeps the best module weights its checkpoint holds
            self.module_best = None
        return optimizer, make_lr_scheduler(optimizer, self.config)

    def train_epoch(self, p: int, epoch: int, optimizer: torch.optim.Optimizer, mid_epoch: dict | None) -> dict:
        return self._train_epoch(self.net, self.train_samples, self.phases[p], p, epoch, optimizer,
                                 self.class_weight, len(self.net.stages), mid_epoch)

    def validate(self, p: int) -> Validation:
        """The phase's last module's classifier (and every auxiliary one) on the validation slides; with
        ``recalibrate_bn`` the BatchNorm statistics follow the epoch's weights first."""
        config, net = self.config, self.net
        if config.recalibrate_bn and not config.weights:
            self._calibrate(net, self.train_samples)
            self.ctx.broadcast_module(net)
        evaluation = evaluate_samples(net, self.val_samples, self.device, upto=self.phases[p].stop,
                                      progress=self.progress, ctx=self.ctx, memory_budget=self._memory_budget(),
                                      stream_tile=config.stream_tile, stream_store=config.stream_store)
        metrics = classification_metrics(evaluation["probabilities"], evaluation["labels"], self.classes)
        row = {**validation_row(evaluation["loss"], metrics), "val_streamed_slides": evaluation["streamed_slides"]}
        labels = evaluation["labels"]
        for m, _ in enumerate(evaluation["aux_probabilities"][0] if evaluation["aux_probabilities"] else []):
            probs = np.array([slide[m] for slide in evaluation["aux_probabilities"]])
            row[f"val_aux{m + 1}_accuracy"] = float((probs.argmax(1) == labels).mean())
        return Validation(evaluation["loss"], metrics, row)

    def scored(self, p: int, score: tuple, epoch_index: int) -> None:
        """Greedy, before module K: keep the phase's module at its best validation epoch so far."""
        if _keeps_best_module(self.config, self.phases[p], len(self.net.stages)) and (
                self.module_best is None or score > tuple(self.module_best["score"])):
            self.module_best = {"score": list(score), "epoch": epoch_index,
                                "weights": _module_weights(self.net, self.phases[p].start)}

    def end_phase(self, p: int, history: list[dict]) -> None:
        """End of a greedy phase before module K: its module and auxiliary model take the weights of their best
        validation epoch (marked ``kept`` in the history), which the next modules then learn on."""
        if not _keeps_best_module(self.config, self.phases[p], len(self.net.stages)):
            return
        if self.module_best is None:  # a checkpoint written before modules kept their best epoch
            return
        net, i = self.net, self.phases[p].start
        net.stages[i].load_state_dict(self.module_best["weights"]["stage"])
        net.aux[i].load_state_dict(self.module_best["weights"]["aux"])
        history[self.module_best["epoch"]]["kept"] = True
        log.info("module %d keeps its weights of epoch %d of the run (best validation %s of its phase)", i + 1,
                 self.module_best["epoch"], self.config.best_by)
        if self.config.recalibrate_bn and not self.config.weights:  # the next modules' statistics follow it
            self._calibrate(net, self.train_samples)
            self.ctx.broadcast_module(net)

    def epoch_done(self, history: list[dict]) -> None:
        """Collect garbage: per-epoch figures and logs form reference cycles; free them before the heap grows
        (``wsilocal bench soak`` samples memory just before)."""
        gc.collect()

    def resumable(self, mid_epoch: dict | None) -> dict:
        """Beside the loop's fields: Ctrl-C's place in the epoch, and (greedy) the phase's module at its best
        epoch so far."""
        return {"mid_epoch": mid_epoch, "module_best": self.module_best}

    def save_checkpoint(self, path: Path, extra: dict) -> None:
        self._save(self.net, path, self.signature, self.classes, extra)

    # --- one epoch ----------------------------------------------------------------------------------
    def _train_epoch(self, net, train: CachedSlides, phase: range, phase_no: int, epoch: int, optimizer,
                     class_weight, k: int, mid_epoch: dict | None = None) -> dict:
        """One epoch (or its rest, from a checkpoint saved ``mid_epoch``); its row of metrics. Raises
        :class:`~wsilocal.train.loop.MidEpochStop` after the optimizer step during which a stop was requested."""
        config, ctx = self.config, self.ctx
        net.train()
        for i in range(phase.start):  # frozen earlier modules (greedy) stay in eval
            net.stages[i].eval()
        stream = epoch + 1000 * phase_no  # seeds the order and each slide's augmentation, RFR and dropout
        order = train.epoch_order(stream)
        # One optimizer step per group of `per_step` consecutive slides of the order; rank r takes the
        # positions ≡ r (mod world size) — groups start at multiples of the world size, so that is the
        # same as r's share of each group.
        per_step = ctx.world_size * config.accumulation
        reducer = GradientAllReduce(gradient_buckets(net, phase)) if ctx.distributed else None
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter() - (mid_epoch["seconds"] if mid_epoch else 0.0)
        # (position in the order, final-classifier loss, correct, RFR losses, streamed) of this rank's slides;
        # those of a mid-epoch checkpoint are all of its ranks' (gathered), so rank 0 carries them on.
        records = [tuple(r) for r in mid_epoch["records"]] if mid_epoch and ctx.is_main else []
        first_group = mid_epoch["next_group"] if mid_epoch else 0
        desc = f"phase {phase_no} epoch {epoch}" if len(_phases(config, k)) > 1 else f"epoch {epoch}"
        bar = tqdm(total=len(ctx.shard(order)), initial=len(ctx.shard(order[:first_group])), desc=desc,
                   unit="slide", leave=False, disable=not self.progress)
        for first in range(first_group, len(order), per_step):
            group = list(enumerate(order[first : first + per_step], start=first))
            mine = ctx.shard(group)
            for n, (position, index) in enumerate(mine):
                # The group may be shorter at the end of the epoch: scale by its true size. Gradients are
                # summed over ranks once, on this rank's last slide of the group.
                sync = reducer.launch if reducer is not None and n == len(mine) - 1 else None
                result, label, streamed = self._train_slide(net, train, index, phase, stream, class_weight,
                                                            1.0 / len(group), sync)
                records.append((position, result.cls_losses[-1], int(result.logits[-1].argmax(1).item() == label),
                                result.rfr_losses, streamed))
                bar.update()
                bar.set_postfix(loss=f"{np.mean([r[1] for r in records]):.3f}")
            if reducer is not None:
                reducer.finish()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if first + per_step < len(order) and stop_agreed(self.stop_requested, ctx):
                bar.close()
                done = first + per_step
                raise MidEpochStop({"next_group": done, "records": self._all_records(records),
                                    "seconds": time.perf_counter() - start}, f"{done} of {len(train)} slides done")
        bar.close()
        ctx.average_running_statistics(net)
        records = self._all_records(records)
        row = {
            "phase": phase_no, "epoch": epoch, "modules": [phase.start, phase.stop],
            "train_loss": float(np.mean([r[1] for r in records])),
            "train_accuracy": sum(r[2] for r in records) / len(order),
            "seconds": time.perf_counter() - start,
            "streamed_slides": sum(r[4] for r in records),  # trained tile by tile (see _streams)
        }
        if records and records[0][3]:
            row["train_rfr_loss"] = [float(v) for v in np.mean(np.array([r[3] for r in records]), axis=0)]
        return row

    def _all_records(self, records: list[tuple]) -> list[tuple]:
        """Every rank's records of the epoch so far (this rank's are ``records``), in order of position."""
        return sorted((r for part in self.ctx.gather_objects(records) for r in part), key=lambda r: r[0])

    def _train_slide(self, net: LocalNet, train: CachedSlides, index: int, phase: range, stream: int,
                     class_weight, loss_scale: float, on_module_backward) -> tuple[StepResult, int, bool]:
        """One slide's training step (gradients accumulate); its result, label and whether it was streamed."""
        config = self.config
        image, label, slide_id = train.get(index, stream)
        tissue = train.tissue(index, stream)
        streamed = self._streams(net, image)
        if not streamed:
            check_trainable_size(image, slide_id, train.entries[index].source, config)
        # Dropout draws from a stream of this slide alone, so it does not matter which rank runs the slide.
        torch.manual_seed(stream_seed(config.seed, Purpose.DROPOUT, stream, index))
        common = {"tissue": tissue, "class_weight": class_weight, "loss_scale": loss_scale,
                  "on_module_backward": on_module_backward}
        with out_of_memory_as_slide_error(
                train.entries[index].source,
                f"slide {slide_id} ({image.shape[-1]}×{image.shape[-2]} px); use --streaming or a smaller "
                "--memory-budget-gb, more modules (--k 8), a coarser --mpp, or a smaller --max-train-pixels to "
                "refuse such slides up front"):
            if config.method == "streaming":
                result = streaming_end_to_end_step(net, TensorSource(image), label, tile=config.stream_tile, **common)
            elif streamed:
                result = streaming_local_step(
                    net, TensorSource(image), label, tile=config.stream_tile,
                    store=resolve_store(config.stream_store, self.device),
                    store_memory_bytes=auto_store_memory_bytes(config.stream_store, self._memory_budget()),
                    active=phase, alpha=config.alpha,
                    generator=sample_generator(config.seed, Purpose.RFR, stream, index),
                    **common)
            else:
                result = local_training_step(
                    net, image.to(self.device), label, active=phase, alpha=config.alpha,
                    generator=sample_generator(config.seed, Purpose.RFR, stream, index), **common)
        return result, label, streamed

    def _streams(self, net: LocalNet, image: torch.Tensor) -> bool:
        """Whether this slide trains streamed: always for ``method: streaming`` and ``--streaming``, otherwise
        when the plain step's estimated memory would exceed the budget (instead of running out of memory)."""
        config = self.config
        if config.method == "streaming" or config.streaming:
            return True
        return should_stream(net, *image.shape[-2:], self._memory_budget())

    def _memory_budget(self) -> int:
        """Bytes a slide's step (or evaluation) may take: ``--memory-budget-gb``, or by default a share of the
        memory available when first asked — measured once per run, so the choice depends on the slide alone."""
        if self.stream_budget is None:
            self.stream_budget = memory_budget_bytes(self.config.memory_budget_gb, self.device)
        return self.stream_budget

    def _save(self, net: LocalNet, path: Path, signature: dict, classes: list[str], extra: dict | None = None):
        if not self.ctx.is_main:
            return
        save_checkpoint({
            "model": net.state_dict(), "signature": signature, "classes": classes,
            "mean": self.mean, "std": self.std, "config": asdict(self.config), **(extra or {}),
        }, path)

def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train a run from a configuration (see :class:`Trainer`)."""
    return Trainer(config, progress=progress, resume=resume).run()
