"""Bytes of tensors that autograd saves for backward — the memory a training step must hold.

This is the deterministic memory measure of the project (the same on every machine and device,
including the ``meta`` device, where nothing is computed). What is counted:

* every tensor an autograd node saves for its backward while the meter is active (the inputs of
  convolutions, the outputs of ReLUs, the indices of max-pooling, the block inputs that activation
  checkpointing keeps, ...), at the size of its whole *storage*;
* each storage once, however many nodes or views save it;
* not ``nn.Parameter`` objects or views of them: they are resident anyway. Tensors *computed* from
  parameters (e.g. a weight with a BatchNorm folded in) are new allocations and are counted.

``current`` falls again when autograd drops a saved tensor (after ``backward()`` or when the graph
is deleted), so ``peak`` is the true high-water mark of saved bytes across several graphs.
Not counted: forward activations nobody saves, gradients, optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _storage_key(tensor: torch.Tensor) -> tuple[int, int]:
    """Identity of the storage behind ``tensor``: (StorageImpl address, bytes).

    The StorageImpl address (rather than ``data_ptr``) tells storages apart on the ``meta`` device too,
    where every data pointer is 0. A key is only looked up while a tensor holding it is alive, so an
    address cannot be reused behind our back.
    """
    storage = tensor.untyped_storage()
    return storage._cdata, storage.nbytes()


class _Saved:
    """What autograd holds instead of a saved tensor while a meter runs; releases its bytes on deletion."""

    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor):
        self.meter = meter
        # detach: holding the tensor with its grad_fn would make a reference cycle for saved outputs.
        self.tensor = tensor.detach()
        self.key = _storage_key(tensor)
        meter._acquire(self.key)

    def __del__(self) -> None:
        self.meter._release(self.key)


class SavedTensorMeter:
    """Context manager that meters the bytes autograd saves for backward inside it.

    ``current``: bytes of distinct storages saved and still held by a graph; ``peak``: its maximum
    since the meter was created or :meth:`reset`. Use one meter around a whole training step and read
    ``peak``, or call :meth:`reset` between modules to get one peak per module.

    >>> with SavedTensorMeter() as meter:
    ...     loss = model(x).sum()
    >>> meter.peak
    """

    def __init__(self) -> None:
        self.current = 0
        self.peak = 0
        self._holders: dict[tuple[int, int], int] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def reset(self) -> None:
        """Restart the peak at the bytes currently held (graphs still alive stay counted)."""
        self.peak = self.current

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s storage is currently saved by a graph metered here."""
        return _storage_key(tensor) in self._holders

    def _acquire(self, key: tuple[int, int]) -> None:
        count = self._holders.get(key, 0)
        if count == 0:
            self.current += key[1]
            self.peak = max(self.peak, self.current)
        self._holders[key] = count + 1

    def _release(self, key: tuple[int, int]) -> None:
        count = self._holders[key] - 1
        if count == 0:
            del self._holders[key]
            self.current -= key[1]
        else:
            self._holders[key] = count

    def _pack(self, tensor: torch.Tensor) -> Any:
        if isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter):  # also W.t() etc.
            return tensor
        return _Saved(self, tensor)

    @staticmethod
    def _unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Saved) else packed

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._hooks is not None
        self._hooks.__exit__(*exc)
        self._hooks = None


def saved_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes saved for backward while running ``fn()`` (which builds a graph, e.g. returns a loss).

    The result of ``fn`` is kept alive until the measurement ends, so its whole graph is counted.
    """
    with SavedTensorMeter() as meter:
        result = fn()
    del result
    return meter.peak
