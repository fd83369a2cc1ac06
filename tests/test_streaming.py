"""Streaming training: StreamingCNN and streaming local learning give the plain steps' gradients exactly.

The block engine (:mod:`wsilocal.stream.blocks`) runs every block in windows of its own output with only its own
halo, and back-propagates each window from stored activations. Precision: one pixel of halo lost at an interior
window edge changes the gradients far more than float32 rounding would hide, so exactness is checked in float64 to
1e-10 (the streamed and plain steps agree to ~1e-12 there; test_wrong_halo_is_caught shows a halo one pixel short
fails that bound). Shapes: a thin image (windows along the long axis in every block, the deep maps one pixel
wide), a small square one and awkward ones (sides not multiples of any stride, tiles that give every block of
every module many window edges both ways, windows one output pixel wide in the deep blocks).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsilocal.bench.memory import (
    _measure,
    _records,
    format_streaming,
    measure_streaming_memory,
    step_config,
)
from wsilocal.bench.options import VARIANTS
from wsilocal.models.local_net import LocalNet, auxiliary_cost
from wsilocal.models.split import module_saved_bytes
from wsilocal.stream import blocks as engine
from wsilocal.stream.forward import whole_forward_bytes
from wsilocal.stream.geometry import block_geometry, footprint
from wsilocal.stream.sources import ArraySource, TensorSource
from wsilocal.train import streaming
from wsilocal.train.activation_store import ActivationStore
from wsilocal.train.local_step import forward_all_classifiers, local_training_step
from wsilocal.train.streaming import (
    should_stream,
    step_memory_estimate,
    streaming_end_to_end_step,
    streaming_forward_all_classifiers,
    streaming_local_step,
)
from wsilocal.train.trainer import evaluate_samples

MEAN, STD = [0.7, 0.55, 0.7], [0.2, 0.25, 0.2]
N_CLASSES, LABEL = 3, 2
FLOAT64_RTOL = 1e-10
THIN, SQUARE = (1400, 24), (300, 260)  # (height, width)
AWKWARD, WIDE = (157, 131), (61, 203)  # no side a multiple of any stride; wider than tall


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_net(split, *, rfr: bool = True, dtype: torch.dtype = torch.float64) -> LocalNet:
    torch.manual_seed(0)
    return LocalNet(N_CLASSES, split, rfr=rfr, rfr_patches=3).to(dtype).train()


def make_source(height: int, width: int) -> ArraySource:
    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return ArraySource(image, MEAN, STD)


def whole(source: ArraySource, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return source.read(0, 0, source.height, source.width).to(dtype)


def take_gradients(net: LocalNet) -> dict[str, torch.Tensor]:
    result = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    net.zero_grad(set_to_none=True)
    return result


def exact_zero(gradient: torch.Tensor, top: float) -> bool:
    """Some gradients are zero in exact arithmetic — the attention scores' bias (softmax ignores a common shift),
    the RFR decoder's conv bias (its BatchNorm subtracts the batch mean) — and hold only rounding noise."""
    return float(gradient.norm()) <= torch.finfo(gradient.dtype).eps ** 0.5 * top


def relative_errors(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖got − reference‖ / ‖reference‖ per parameter tensor whose gradient is not zero in exact arithmetic."""
    assert got.keys() == reference.keys()
    top = max(float(g.norm()) for g in reference.values())
    return {name: float((got[name] - g).norm() / g.norm()) for name, g in reference.items() if not exact_zero(g, top)}


def assert_same_gradients(got, reference, rtol=FLOAT64_RTOL):
    errors = relative_errors(got, reference)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.2e}"
    top = max(float(g.norm()) for g in reference.values())
    assert all(exact_zero(got[name], top) for name in reference.keys() - errors.keys())


# --- StreamingCNN --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hw", "tile"), [(THIN, 720), (AWKWARD, 100)], ids=["thin", "awkward"])
def test_streaming_cnn_gradients_equal_a_whole_image_backward(hw, tile, tmp_path):
    net, source = make_net(1), make_source(*hw)
    target = torch.tensor([LABEL])
    torch.manual_seed(7)  # the same dropout mask in H for both
    logits, _ = net.head(net.trunk(whole(source)))
    loss = F.cross_entropy(logits, target)
    loss.backward()
    reference = take_gradients(net)

    # Every block runs in several windows along the rows (thin: 2 per block; awkward: the deep blocks' windows are
    # 2 output pixels, one pixel of their halo each side).
    module = engine.StreamedBlocks(net.trunk.blocks(), source, tile, streaming.store_factory("memory", torch.float64),
                                   keep=False)
    assert all(len({w[0] for w in module.windows(b)}) >= 2 for b in range(len(module.plans)))
    torch.manual_seed(7)
    done = []
    result = streaming_end_to_end_step(net, source, LABEL, tile=tile, on_module_backward=done.append, store="disk",
                                       store_dir=tmp_path)
    assert done == [0]
    assert result.cls_losses == [pytest.approx(float(loss.detach()), rel=1e-12)]
    torch.testing.assert_close(result.logits[0], logits.detach(), rtol=1e-12, atol=0)
    assert {name.split(".")[0] for name in reference} == {"trunk", "head"}
    assert_same_gradients(take_gradients(net), reference)
    assert list(tmp_path.iterdir()) == []  # every store between blocks is gone


# --- streaming local learning ----------------------------------------------------------------------------

LOCAL_CASES = [
    # (K, RFR, image, tile per module in image px, class weights)
    pytest.param(4, True, SQUARE, (64, 64, 192, 4096), False, id="K4-rfr-square"),
    pytest.param(4, False, THIN, 480, True, id="K4-norfr-thin-weighted"),
    pytest.param(2, True, THIN, 480, False, id="K2-rfr-thin"),
    pytest.param(2, False, SQUARE, (64, 4096), True, id="K2-norfr-square-weighted"),
    # Windows of one or two output pixels in the deep blocks, many window edges in every block, both ways.
    pytest.param(4, True, AWKWARD, 40, False, id="K4-rfr-awkward-tiny-tiles"),
    pytest.param(8, True, WIDE, 30, True, id="K8-rfr-wide-tiny-tiles-weighted"),
    pytest.param(8, False, THIN, 100, False, id="K8-norfr-thin"),
]


@pytest.mark.parametrize("k, rfr, hw, tile, weighted", LOCAL_CASES)
def test_streaming_local_step_equals_the_local_step(k, rfr, hw, tile, weighted):
    net, source = make_net(k, rfr=rfr), make_source(*hw)
    class_weight = torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64) if weighted else None
    kwargs = {"alpha": 0.7, "class_weight": class_weight, "loss_scale": 0.25}
    torch.manual_seed(3)  # dropout of every attention pooling draws the same masks in both steps
    plain = local_training_step(net, whole(source), LABEL, generator=torch.Generator().manual_seed(5), **kwargs)
    reference = take_gradients(net)
    decoder_stats = [aux.rfr.decoder[-3].running_mean.clone() for aux in net.aux if aux.rfr is not None]

    torch.manual_seed(3)
    done = []
    streamed = streaming_local_step(net, source, LABEL, tile=tile, generator=torch.Generator().manual_seed(5),
                                    on_module_backward=done.append, **kwargs)
    assert done == list(range(k))
    assert streamed.cls_losses == pytest.approx(plain.cls_losses, rel=1e-12)
    assert streamed.rfr_losses == pytest.approx(plain.rfr_losses, rel=1e-12)
    assert len(streamed.rfr_losses) == k - 1 and (min(streamed.rfr_losses) > 0) == rfr
    for a, b in zip(streamed.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert {name.split(".")[0] for name in reference} == {"trunk", "aux", "head"}
    assert_same_gradients(take_gradients(net), reference)
    # The RFR decoders' BatchNorm saw the same patch batch twice (same locations, same generator): from 0, its
    # running mean went to 0.1·m after the plain step and to 0.9·0.1·m + 0.1·m = 1.9× that after the streamed one.
    for aux, stats in zip([a for a in net.aux if a.rfr is not None], decoder_stats, strict=True):
        torch.testing.assert_close(aux.rfr.decoder[-3].running_mean, 1.9 * stats, rtol=1e-10, atol=1e-14)


def test_every_block_streams_over_a_2d_grid_of_windows():
    """The square case at tile 64 cuts every block of every module both ways, with interior window edges; the
    windows partition each block's output, and each reads only its own block's halo."""
    net, source = make_net(4), make_source(*SQUARE)
    current = source
    for stage, spec in zip(net.stages, net.specs, strict=True):
        module = engine.StreamedBlocks(list(stage), current, 64 // spec.in_stride,
                                       streaming.store_factory("memory", torch.float64), keep=False)
        for index, plan in enumerate(module.plans):
            windows = module.windows(index)
            rows, cols = (sorted({w[axis] for w in windows}) for axis in (0, 1))
            assert len(windows) == len(rows) * len(cols) and len(rows) > 2 and len(cols) > 2
            stride, first, last = footprint(block_geometry([plan.block]))
            for axis, spans in enumerate((rows, cols)):
                assert spans[0][0] == 0 and spans[-1][1] == plan.out_hw[axis]
                assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
                # A window reads its output's footprint through the block's own layers (clipped to the map).
                for o0, o1 in spans:
                    region = [rows[0], cols[0]]
                    region[axis] = (o0, o1)
                    have, _ = plan.regions(tuple(region))
                    assert have[0][axis] == (max(0, o0 * stride + first),
                                          min(plan.hws[0][axis], (o1 - 1) * stride + last + 1))
        current = ArraySource(np.zeros((*module.out_hw, 3), np.uint8), MEAN, STD)  # only its size matters


@pytest.mark.parametrize("hw", [THIN, AWKWARD, WIDE, (50, 7)], ids=["thin", "awkward", "wide", "tiny"])
def test_block_engine_forward_equals_the_whole_trunk(hw):
    """The forward alone (each block's input released once used), float64, tiles down to one output pixel."""
    net, source = make_net(1).eval(), make_source(*hw)
    with torch.no_grad():
        reference = net.trunk(whole(source))
    for tile in (48, 100, 4096):
        module = engine.StreamedBlocks(net.trunk.blocks(), source, tile,
                                       streaming.store_factory("memory", torch.float64), keep=False)
        out = module.forward()
        got = out.read(0, 0, out.height, out.width)
        module.close()
        assert got.shape == reference.shape
        torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()))


@pytest.mark.parametrize(("split", "upto", "hw", "tile"), [(4, None, SQUARE, 64), (4, 2, SQUARE, 64),
                                                           (1, None, THIN, 480), (2, None, THIN, 480)])
def test_streamed_evaluation_gives_every_classifiers_logits(split, upto, hw, tile, tmp_path):
    """Evaluating a slide too large to run whole: the same logits as forward_all_classifiers, window by window."""
    net, source = make_net(split).eval(), make_source(*hw)
    with torch.no_grad():
        reference = forward_all_classifiers(net, whole(source), upto=upto)
    streamed = streaming_forward_all_classifiers(net, source, upto=upto, tile=tile, store="disk", store_dir=tmp_path)
    assert len(streamed) == len(reference) == (upto or split)
    for got, expected in zip(streamed, reference, strict=True):
        assert not got.requires_grad
        assert torch.allclose(got, expected, rtol=FLOAT64_RTOL, atol=FLOAT64_RTOL * float(expected.abs().max()))
    assert list(tmp_path.iterdir()) == []  # the stores' files are gone


class _Samples:
    """The part of CachedSlides that evaluate_samples uses."""

    def __init__(self, sources: list[ArraySource], labels: list[int]):
        self.sources, self.labels = sources, labels

    def __len__(self) -> int:
        return len(self.sources)

    def get(self, index: int):
        return whole(self.sources[index], torch.float32), self.labels[index], f"slide{index}"

    def tissue(self, index: int) -> None:  # no glass masking (tests/test_glass_mask.py has it)
        return None


def test_evaluate_samples_streams_slides_over_the_memory_budget():
    net = make_net(4, dtype=torch.float32)
    samples = _Samples([make_source(*SQUARE), make_source(150, 200)], [LABEL, 0])
    plain = evaluate_samples(net, samples, torch.device("cpu"))
    # A budget between the two slides' whole-forward estimates: only the larger one streams.
    budget = whole_forward_bytes(net.trunk, 150, 200)
    mixed = evaluate_samples(net, samples, torch.device("cpu"), memory_budget=budget, stream_tile=64)
    assert (plain["streamed_slides"], mixed["streamed_slides"]) == (0, 1)
    assert np.allclose(mixed["probabilities"], plain["probabilities"], atol=1e-5)
    for got, expected in zip(mixed["aux_probabilities"], plain["aux_probabilities"], strict=True):
        assert np.allclose(got, expected, atol=1e-5)
    assert mixed["loss"] == pytest.approx(plain["loss"], abs=1e-5)


def test_greedy_phase_streams_frozen_modules_forward_only():
    net, source = make_net(4, rfr=False, dtype=torch.float32), make_source(*SQUARE)
    active = range(1, 3)
    torch.manual_seed(0)
    plain = local_training_step(net, whole(source, torch.float32), LABEL, active=active)
    reference = take_gradients(net)
    torch.manual_seed(0)
    streamed = streaming_local_step(net, source, LABEL, tile=(64, 64, 192, 4096), active=active)
    assert streamed.cls_losses == pytest.approx(plain.cls_losses, rel=1e-5)
    got = take_gradients(net)
    assert not any(name.startswith(("trunk.layer1.0", "aux.0", "head", "trunk.layer4")) for name in got)
    assert_same_gradients(got, reference, rtol=1e-4)  # float32: the brief's bound


@pytest.mark.parametrize("wrong", [False, True])
def test_wrong_halo_is_caught(monkeypatch, wrong):
    """Module 1 alone on a 2-D grid: the exact windows pass the float64 bound; windows whose halo is one pixel
    short at interior edges (zero padding where the neighbour's real pixels belong) fail it by far."""
    net, source = make_net(4), make_source(*SQUARE)
    torch.manual_seed(0)
    local_training_step(net, whole(source), LABEL, active=range(0, 1), generator=torch.Generator().manual_seed(1))
    reference = take_gradients(net)
    if wrong:
        clip = engine.clip_region

        def short(region, hw):
            return tuple((lo + (lo > 0), hi - (hi < n)) for (lo, hi), n in zip(clip(region, hw), hw, strict=True))

        monkeypatch.setattr(engine, "clip_region", short)
    torch.manual_seed(0)
    streaming_local_step(net, source, LABEL, tile=64, active=range(0, 1), generator=torch.Generator().manual_seed(1))
    worst = max(relative_errors(take_gradients(net), reference).values())
    assert (worst > 1e-4) if wrong else (worst <= FLOAT64_RTOL)


def test_disk_store_gives_identical_results(tmp_path):
    net, source = make_net(2, dtype=torch.float32), make_source(200, 150)
    runs = []
    for where in ("memory", "disk"):
        torch.manual_seed(0)
        result = streaming_local_step(net, source, LABEL, tile=96, store=where, store_dir=tmp_path,
                                      generator=torch.Generator().manual_seed(2))
        runs.append((result, take_gradients(net)))
    (memory, memory_grads), (disk, disk_grads) = runs
    assert disk.cls_losses == memory.cls_losses and disk.rfr_losses == memory.rfr_losses
    assert disk_grads.keys() == memory_grads.keys()
    assert all(torch.equal(disk_grads[name], g) for name, g in memory_grads.items())
    assert list(tmp_path.iterdir()) == []  # the store's file never had a name to leave behind


def test_auto_store_keeps_maps_in_memory_up_to_its_bytes_then_takes_files(tmp_path):
    make = streaming.store_factory("disk", torch.float32, tmp_path, memory_bytes=2 * 4 * 10 * 10)
    first, second, third = (make((1, 10, 10), False) for _ in range(3))
    assert (first.where, second.where, third.where) == ("memory", "memory", "disk")  # 400 B each, 800 B allowed
    first.close()  # a closed store gives its bytes back
    assert make((1, 10, 10), True).where == "memory"
    assert make((1, 30, 30), False).where == "disk"  # larger than what is left
    # A step with part of its maps in memory, part in files: the same losses and gradients as all in files.
    net, source = make_net(2, dtype=torch.float32), make_source(200, 150)
    runs = []
    for memory_bytes in (None, 600_000):  # 600 kB: 10 of its 50 stores in memory
        torch.manual_seed(0)
        result = streaming_local_step(net, source, LABEL, tile=96, store="disk", store_dir=tmp_path,
                                      store_memory_bytes=memory_bytes, generator=torch.Generator().manual_seed(2))
        runs.append((result, take_gradients(net)))
    (disk, disk_grads), (mixed, mixed_grads) = runs
    assert mixed.cls_losses == disk.cls_losses and mixed.rfr_losses == disk.rfr_losses
    assert all(torch.equal(mixed_grads[name], g) for name, g in disk_grads.items())
    assert streaming.auto_store_memory_bytes("auto", 1000) == 500
    assert streaming.auto_store_memory_bytes("disk", 1000) is None


def test_tile_per_module_must_match_k():
    net, source = make_net(4, dtype=torch.float32), make_source(64, 64)
    with pytest.raises(ValueError, match=r"expected one tile or 4 \(one per module\), got \[64, 64\]"):
        streaming_local_step(net, source, LABEL, tile=(64, 64))


# --- the activation store -------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_activation_store_round_trip(tmp_path, where):
    block = torch.randn(1, 5, 7, 11, dtype=torch.float64)
    with ActivationStore.create((5, 20, 30), torch.float64, where=where, dir=tmp_path) as store:
        assert store.shape == (5, 20, 30) and isinstance(store.array, np.memmap) == (where == "disk")
        assert list(tmp_path.iterdir()) == []  # unlinked as soon as mapped
        store.write(3, 19, block)
        window = store.read(3, 19, 7, 11)
        assert window.dtype == torch.float64 and window.is_contiguous() and torch.equal(window, block)
        window.zero_()  # a copy: the store keeps its values
        assert torch.equal(store.read(4, 20, 2, 3), block[:, :, 1:3, 1:4])
        with pytest.raises(ValueError, match=r"window \(top=15, left=0, height=7, width=11\) is not inside "
                                             r"the 20x30 activation store"):
            store.write(15, 0, block)
        with pytest.raises(ValueError, match=r"expected a \(1, 5, h, w\) torch.float64 block, got \(1, 5, 7, 11\) "
                                             r"torch.float32"):
            store.write(0, 0, block.float())
    assert store.height == store.width == 0


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_activation_store_windows_are_views_to_copy_and_add_into(tmp_path, where):
    with ActivationStore.create((3, 6, 8), torch.float64, where=where, dir=tmp_path, zero=True) as store:
        assert torch.equal(store.read(0, 0, 6, 8), torch.zeros(1, 3, 6, 8, dtype=torch.float64))
        block = torch.randn(1, 3, 2, 4, dtype=torch.float64)
        store.window(1, 2, 2, 4).add_(block)
        store.window(2, 3, 2, 4).add_(block)  # overlapping windows accumulate
        expected = torch.zeros(1, 3, 6, 8, dtype=torch.float64)
        expected[:, :, 1:3, 2:6] += block
        expected[:, :, 2:4, 3:7] += block
        assert torch.equal(store.read(0, 0, 6, 8), expected)
        view = store.window(0, 0, 6, 8)
        assert view.is_contiguous(memory_format=torch.channels_last)  # the (H, W, C) array, seen as (1, C, H, W)
        view.copy_(expected * 2)
        assert torch.equal(store.read(0, 0, 6, 8), expected * 2)
        with pytest.raises(ValueError, match="is not inside"):
            store.window(5, 0, 2, 8)


def test_activation_store_refuses_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="where must be one of"):
        ActivationStore.create((1, 2, 2), where="gpu")
    with pytest.raises(ValueError, match="cannot hold torch.bfloat16"):
        ActivationStore.create((1, 2, 2), torch.bfloat16)
    with pytest.raises(ValueError, match=r"shape must be positive, got \(0, 2, 2\)"):
        ActivationStore.create((0, 2, 2))


def test_tensor_source_reads_views():
    tensor = torch.arange(2 * 4 * 5, dtype=torch.float32).view(1, 2, 4, 5)
    source = TensorSource(tensor)
    assert (source.height, source.width) == (4, 5)
    assert torch.equal(source.read(1, 2, 2, 3), tensor[:, :, 1:3, 2:5])
    with pytest.raises(ValueError, match=r"expected a \(1, C, H, W\) tensor, got \(2, 4, 5\)"):
        TensorSource(tensor[0])


# --- when to stream ---------------------------------------------------------------------------------------


def test_memory_estimate_and_the_choice_to_stream():
    net = make_net(4, dtype=torch.float32)
    hw = (5000, 3100)  # not a reference size, not square
    exact = max(module_saved_bytes(net.trunk, 4, hw, auxiliary_cost(N_CLASSES, rfr_patches=3))) + 12 * hw[0] * hw[1]
    estimate = step_memory_estimate(net, *hw)
    assert estimate == pytest.approx(exact, rel=0.005)
    assert should_stream(net, *hw, estimate - 1) and not should_stream(net, *hw, estimate)
    # Memory grows with the slide: a slide 4x the area needs about 4x (the RFR decoders are the fixed part).
    assert 3.5 < step_memory_estimate(net, 2 * hw[0], 2 * hw[1]) / estimate < 4.0


def test_tiles_for_budget_are_the_largest_whose_windows_fit():
    net = make_net(4, dtype=torch.float32)
    budget = 64 * 2**20
    tiles = streaming.tiles_for_budget(net, budget)
    for stage, spec, tile in zip(net.stages, net.specs, tiles, strict=True):
        size = [engine.window_bytes(list(stage), (tile + d * spec.out_stride) // spec.in_stride) for d in (0, 1)]
        assert tile % spec.out_stride == 0 and size[0] <= budget < size[1]
    assert tiles[-1] > tiles[0]  # the deep modules' maps are smaller per image pixel


# --- the benchmark's streaming rows -------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["", "memory"])
def test_bench_child_measures_a_streaming_step(monkeypatch, store):
    """One real measurement subprocess: the streamed K=4 step's saved bytes as in-process, anonymous RSS; x_i in
    files by default on CPU, in memory when asked (``--stream-store``), the same saved bytes either way."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = step_config(VARIANTS["streaming"], 4, (128, 160), rfr=False, tile=64, store=store)
    assert config.streaming and config.fold_bn and config.boundaries == (3, 6, 11) and config.store == store
    measured = _measure({"mode": "memory", "configs": [asdict(config)]})
    assert measured["tiles"] == [64] * 4 and measured["device"] == "cpu"
    assert measured["store"] == (store or "disk")
    assert 50 * 2**20 < measured["rss_baseline_bytes"] <= measured["rss_model_bytes"] <= measured["peak_rss_bytes"]
    assert measured["peak_rss_bytes"] <= measured["peak_vm_hwm_bytes"]  # anonymous memory is part of the RSS
    in_process = measure_streaming_memory(config.build(), config, config.inputs())
    assert (measured["saved_bytes"], measured["per_module_saved_bytes"]) == \
        (in_process.saved_bytes, in_process.per_module_saved_bytes)
    assert len(in_process.per_module_saved_bytes) == 4 and in_process.left_over_bytes == 0


def test_bench_streaming_records_and_report():
    """Ratios against the plain step and StreamingCNN, growth with the slide, the report's verdicts."""
    sizes = [(128, 128), (256, 256)]
    plan, measured, times = [], {}, {}
    for hw in sizes:
        for name, k in [("paper", 1), ("folded", 1), ("folded", 4), ("streaming", 1), ("streaming", 4)]:
            if hw == sizes[1] and name != "streaming":
                continue  # the plain steps "do not fit" at the larger size
            config = step_config(VARIANTS[name], k, hw, rfr=False, tile=64)
            plan.append((VARIANTS[name], k, hw, config))
            side = 1 + (hw == sizes[1])
            rss = 100 * k * side * (2 if name == "paper" else 1)
            measured[config] = {"saved_bytes": 1000 * k * side, "peak_rss_bytes": rss,
                                "per_module_saved_bytes": [1000 * k * side] * k, "tiles": [64] * k}
            times[config] = [float(k * side * (2 if config.streaming else 1))]
    records = {(r["method"], r["k"], r["height"]): r for r in _records(plan, measured, times)}
    small, large = records[("streaming_local", 4, 128)], records[("streaming_local", 4, 256)]
    assert (small["ratio_time_nonstreaming"], small["ratio_rss_nonstreaming"]) == (2.0, 1.0)
    assert small["ratio_rss_paper_style"] == 2.0 and large["ratio_rss_paper_style"] is None
    assert large["ratio_time_nonstreaming"] is None and (large["area_growth"], large["rss_growth"]) == (4.0, 2.0)
    assert large["ratio_rss"] == 4.0  # against StreamingCNN at the same size
    report = format_streaming(list(records.values()))
    assert "| 256×256 | streaming_local | 4 | — | 64 | 0 | 0 | — | — | 16.0 | — | 4.0 / 2.00 | 400.0 % | 4.00× |" \
        in report
    assert "- 256×256, K=4: memory ×2.00 for area ×4.0 (×2.00 per 4× area): NOT met" in report
    assert "- 128×128, K=4: step time 2.00× the plain step: NOT met" in report


def test_bench_streaming_only_sizes_take_the_memory_runs_step_time():
    """Where only streaming runs there are no timing rounds: the memory run's one step is the step time, marked."""
    hw = (256, 256)
    config = step_config(VARIANTS["streaming"], 4, hw, rfr=False, tile=64)
    measured = {config: {"saved_bytes": 4000, "peak_rss_bytes": 400, "per_module_saved_bytes": [1000] * 4,
                         "tiles": [64] * 4, "first_step_seconds": 7.5}}
    plan = [(VARIANTS["streaming"], 4, hw, config)]
    untimed, = _records(plan, measured, {})
    assert (untimed["step_seconds"], untimed["step_timing"]) == (None, None)
    record, = _records(plan, measured, {}, first_step_sizes=[hw])
    assert (record["step_seconds"], record["step_timing"]) == (7.5, "first step")
    report = format_streaming([record])
    assert "| 256×256 | streaming_local | 4 | — | 64 |" in report and "| 7.5¹ |" in report
    assert "¹ one step, timed in the memory run" in report
