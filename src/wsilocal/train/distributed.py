"""Data-parallel training over several processes (one per GPU, or several on a CPU), launched by ``torchrun``.

Every rank holds the whole model and trains on its own share of each epoch's slides; the ranks agree on
the result by summing gradients before every optimizer step. What this module provides:

* :func:`distributed_session` — detects ``torchrun`` (``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` in the
  environment), starts the process group (NCCL on GPUs, each rank on its ``LOCAL_RANK`` device; gloo on
  the CPU) and ends it cleanly; outside torchrun it yields a one-process :class:`DistContext`.
* :class:`DistContext` — rank, world size, device, and the few collective operations the trainer needs
  (run on rank 0 and share the result, gather per-rank records, broadcast the model, split a list).
* :class:`GradientAllReduce` — why not one DDP wrapper: the K modules are gradient-isolated and run one
  after another inside :func:`~wsilocal.train.local_step.local_training_step`. So as soon as module i's
  backward is over, its gradients (trunk part and auxiliary model G_i, or the classifier H) are flattened
  into one bucket and summed across ranks with an *asynchronous* all-reduce, which runs while module i+1
  computes; :meth:`GradientAllReduce.finish` waits for every bucket before the optimizer step.
* :func:`relaunch_under_torchrun` — what ``wsilocal train --devices N`` does: start itself N times under
  torchrun; :func:`spawn_processes` — N processes from Python (tests, benchmarks), no torchrun needed.

The arithmetic matches one process exactly (up to float summation order): an optimizer step covers a
group of ``world_size × accumulation`` consecutive slides of the epoch order, every rank scales its losses by
``1 / (true size of the group)`` and the all-reduce *sums*, so the step sees the mean gradient over the
group, just as one process with accumulation ``world_size × accumulation`` does. The one exception: the
running statistics of the RFR decoders' BatchNorms (used by no output) are each rank's own running
averages, averaged over ranks at the end of every epoch, not one running average over all slides.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from wsilocal.errors import ConfigError, WsilocalError

T = TypeVar("T")
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
# How long a rank waits in a collective. Longer than torch's default (10 min NCCL, 30 min gloo) because the
# other ranks wait while rank 0 fills a missing slide cache (prepare big cohorts first: `wsilocal prepare`).
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)
BATCH_NORMS = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` processes and the device it computes on.

    With ``world_size == 1`` every collective below is a no-op, so the trainer has one code path.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, logs and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world_size``-th one from position ``rank``.

        Shares differ in size by at most one and together hold every item exactly once.
        """
        return list(items[self.rank :: self.world_size])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, obj)
        return parts

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give its result (picklable) to every rank.

        A :class:`WsilocalError` raised by ``fn`` is raised on every rank (on the others as a plain
        WsilocalError with the same message), so no rank is left waiting in a collective.
        """
        if not self.distributed:
            return fn()
        message: list[Any] = [None]
        if self.is_main:
            try:
                message[0] = ("ok", fn())
            except WsilocalError as exc:
                message[0] = ("error", str(exc))
                dist.broadcast_object_list(message, src=0)
                raise
        dist.broadcast_object_list(message, src=0)
        status, value = message[0]
        if status == "error":
            error = WsilocalError(value)
            error.reported_by_rank0 = True  # type: ignore[attr-defined]  # the CLI prints it once, on rank 0
            raise error
        return value

    def average_running_statistics(self, module: torch.nn.Module) -> None:
        """Give every rank the mean running statistics of the BatchNorms that learn them (the RFR decoders').

        Each rank updated them on its own slides. No output depends on them (a decoder runs only in training,
        normalising with batch statistics), but all ranks, and the checkpoint, should hold one value.
        """
        if not self.distributed:
            return
        for m in module.modules():
            if isinstance(m, BATCH_NORMS) and m.training and m.track_running_stats:
                for statistic in (m.running_mean, m.running_var):
                    dist.all_reduce(statistic)
                    statistic.div_(self.world_size)
                dist.all_reduce(m.num_batches_tracked, op=dist.ReduceOp.MAX)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers (BatchNorm statistics included) into every rank's module."""
        if self.distributed:
            for tensor in module.state_dict().values():  # views of the module's own storage: updated in place
                dist.broadcast(tensor, src=0)


def torchrun_environment() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when started by torchrun (or an equivalent launcher), else None."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    except ValueError:
        raise ConfigError("environment: RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of one rank: its ``LOCAL_RANK``-th GPU when training on CUDA, else ``device`` itself."""
    if device.type != "cuda":
        return device
    if device.index is not None and device.index != local_rank:
        raise ConfigError(f"config: device {device} names one GPU, but with several processes each rank uses "
                          "the GPU of its LOCAL_RANK; set device to 'cuda' or 'auto'")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                          "start at most that many processes per node")
    return torch.device("cuda", local_rank)


@contextmanager
def distributed_session(device: torch.device) -> Iterator[DistContext]:
    """The :class:`DistContext` of this process; starts and ends the process group when torchrun started us.

    A process group the caller already started (a test, a notebook) is used and left running.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        yield DistContext(rank, world, local_rank, rank_device(device, local_rank) if world > 1 else device)
        return
    env = torchrun_environment()
    if env is None or env[1] == 1:
        yield DistContext(device=device)
        return
    rank, world, local_rank = env
    device = rank_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=PROCESS_GROUP_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)
    try:
        yield DistContext(rank, world, local_rank, device)
    finally:
        dist.destroy_process_group()


class GradientAllReduce:
    """Sums the gradients of each local module over all ranks, one flat bucket per module.

    ``modules`` maps a module index to its trainable parameters (trunk part + auxiliary model, or + H).
    Pass :meth:`launch` as ``on_module_backward`` to the *last* ``local_training_step`` before an optimizer
    step (earlier accumulation steps only accumulate locally), then call :meth:`finish`. With
    ``overlap=False`` the buckets are only sent in :meth:`finish`, after all compute (for the benchmark).

    Every rank sends the buckets in increasing module order, which is what matches collectives across
    ranks; a rank with no slide in a group (the short last group of an epoch) sends zeros in
    :meth:`finish`. A parameter without a gradient on every rank keeps ``grad = None`` (as in one process).
    """

    def __init__(self, modules: dict[int, list[torch.nn.Parameter]], overlap: bool = True):
        self.modules = dict(sorted(modules.items()))
        self.overlap = overlap
        self._pending: dict[int, tuple[torch.Tensor, Any]] = {}
        self.wait_seconds = 0.0  # time blocked in finish(): the communication compute did not hide

    def launch(self, index: int) -> None:
        """Module ``index``'s backward is done: start summing its gradients (asynchronously)."""
        if self.overlap:
            self._start(index)

    def _start(self, index: int) -> None:
        params = self.modules[index]
        present = [p.grad is not None for p in params]
        # One flat buffer per module: few large messages; the trailing 0/1 per parameter says who had a grad.
        flat = torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params]
                         + [torch.tensor(present, dtype=params[0].dtype, device=params[0].device)])
        self._pending[index] = (flat, dist.all_reduce(flat, async_op=True))

    def finish(self) -> None:
        """Send what is not sent yet, wait for every bucket and write the sums into ``.grad``."""
        for index in self.modules:
            if index not in self._pending:
                self._start(index)
        start = time.perf_counter()
        for index, (flat, work) in self._pending.items():
            work.wait()
            params = self.modules[index]
            present = flat[-len(params) :].tolist()
            offset = 0
            for p, had_grad in zip(params, present, strict=True):
                values = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if not had_grad:
                    p.grad = None
                elif p.grad is None:
                    p.grad = values.clone()
                else:
                    p.grad.copy_(values)
        if self._pending and next(iter(self._pending.values()))[0].is_cuda:
            torch.cuda.current_stream().synchronize()  # count the GPU's wait, not only the enqueueing
        self.wait_seconds += time.perf_counter() - start
        self._pending.clear()


def torchrun_arguments(nproc: int, argv: Sequence[str]) -> list[str]:
    """torchrun's arguments to run ``wsilocal ARGV`` as ``nproc`` processes on this machine."""
    return ["--standalone", f"--nproc-per-node={nproc}", "--module", "wsilocal", *argv]


def relaunch_under_torchrun(nproc: int, argv: Sequence[str], device: torch.device) -> int:
    """Run ``wsilocal ARGV`` as ``nproc`` processes (``wsilocal train --devices N``); their exit code.

    torchrun's agent runs in this process and starts the workers; when one fails, the others are stopped and
    the failure's exit code is returned (the worker printed its own one-line error: no launcher traceback).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"--devices {nproc}: this machine has {torch.cuda.device_count()} GPU(s); "
                          "use at most that many, or device: cpu")
    # Share the CPU cores out among the processes (torchrun alone would give each one thread).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # The agent logs each failed worker on top of the worker's own message: keep only the worker's.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun(torchrun_arguments(nproc, argv))
    except ChildFailedError as exc:
        return exc.get_first_failure()[1].exitcode
    return 0


def spawn_processes(fn: Callable[..., None], nprocs: int, args: tuple = (), *, backend: str = "gloo",
                    threads: int | None = None) -> None:
    """Run ``fn(ctx, *args)`` in ``nprocs`` fresh processes joined in one process group on this machine.

    ``fn`` must be importable (a module-level function); ``backend="nccl"`` puts rank r on GPU r. Each process
    uses ``threads`` CPU threads (default: the cores shared out). A failure in any process raises here.
    """
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // nprocs)
    with tempfile.TemporaryDirectory(prefix="wsilocal-pg-") as folder:  # a file rendezvous: no port to pick
        mp.spawn(_spawned_main, args=(fn, nprocs, f"file://{folder}/store", backend, threads, args), nprocs=nprocs)


def _spawned_main(rank: int, fn: Callable[..., None], world: int, init_method: str, backend: str, threads: int,
                  args: tuple) -> None:
    torch.set_num_threads(threads)
    os.environ["LOCAL_RANK"] = str(rank)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None)
    try:
        fn(DistContext(rank, world, rank, device), *args)
    finally:
        dist.destroy_process_group()
