"""`wsilocal bench memory`: records, ratios, the meter against a plain forward, the subprocess RSS path."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsilocal.bench.memory import (
    LABEL,
    OUTSIDE,
    StepConfig,
    format_memory_table,
    format_projection,
    measure_step_memory,
    project_saved_bytes,
    recompute_bound_bytes,
    run_memory_benchmark,
    step_config,
)
from wsilocal.bench.options import VARIANTS, add_memory_arguments
from wsilocal.errors import ConfigError
from wsilocal.models.memory import saved_tensor_bytes
from wsilocal.models.resnet import FrozenBatchNorm2d
from wsilocal.models.split import block_boundaries

KEYS = {"method", "k", "height", "width", "saved_bytes", "peak_rss_bytes", "ratio_saved", "ratio_rss",
        "ratio_saved_paper_style", "ratio_rss_paper_style", "variant", "fold_bn", "recompute", "balanced",
        "boundaries", "step_seconds", "ratio_time", "cuda_max_allocated", "per_module_saved_bytes",
        "per_module_breakdown", "rss_model_bytes"}


pytestmark = pytest.mark.usefixtures("one_thread_everywhere")


@pytest.fixture(scope="module")
def bench(module_tmp):
    """One real run: paper-style K=1, folded K=1 and K=4 at 128², each in its own subprocess, timed once.

    Without RFR: at 128² the RFR decoders' fixed cost (10 patches of 128 px) would dwarf the trunk and
    K=4 would save *more* than K=1 (see test_rfr_decoders_cost_the_same_at_any_input_size)."""
    out = module_tmp("bench")
    records = run_memory_benchmark(out, sizes=((128, 128),), ks=(4,), variants=("folded",), repeats=1,
                                   rfr=False, progress=False)
    return out, {(r["variant"], r["k"]): r for r in records}


def test_records_have_all_keys_and_k1_is_the_reference(bench):
    _, records = bench
    assert set(records) == {("paper", 1), ("folded", 1), ("folded", 4)}  # K=1 and paper K=1 added
    for r in records.values():
        assert KEYS <= r.keys() and r["error"] is None
        assert (r["height"], r["width"], r["rfr"]) == (128, 128, False)
    for key in ("ratio_saved", "ratio_rss", "ratio_time"):
        assert records[("folded", 1)][key] == 1.0 and records[("paper", 1)][f"{key}_paper_style"] == 1.0
    four = records[("folded", 4)]
    assert four["method"] == "local" and records[("folded", 1)]["method"] == "end-to-end"
    assert four["boundaries"] == [3, 6, 11] and len(four["per_module_saved_bytes"]) == 4
    assert four["ratio_saved"] == four["saved_bytes"] / records[("folded", 1)]["saved_bytes"]
    assert four["ratio_saved_paper_style"] == four["saved_bytes"] / records[("paper", 1)]["saved_bytes"]
    assert four["ratio_time"] == four["step_seconds"] / records[("folded", 1)]["step_seconds"]


def test_more_modules_and_folding_save_fewer_bytes(bench):
    _, records = bench
    assert records[("folded", 4)]["saved_bytes"] < records[("folded", 1)]["saved_bytes"]
    assert records[("folded", 1)]["saved_bytes"] < records[("paper", 1)]["saved_bytes"]
    assert records[("folded", 4)]["saved_bytes"] == max(records[("folded", 4)]["per_module_saved_bytes"])


def test_subprocess_measures_rss_and_the_same_saved_bytes_as_in_process(bench):
    _, records = bench
    for (variant, k), r in records.items():
        assert 50 * 2**20 < r["rss_baseline_bytes"] <= r["rss_model_bytes"] <= r["peak_rss_bytes"]
        assert r["cuda_max_allocated"] is None and r["device"] == "cpu"  # this machine has no GPU
        assert r["threads"] == 1  # the child saw OMP_NUM_THREADS
        assert r["step_seconds"] > 0 and len(r["step_seconds_all"]) == 1
        config = step_config(VARIANTS[variant], k, (128, 128), rfr=False)
        assert measure_step_memory(config.build(), config.image()).saved_bytes == r["saved_bytes"]


def test_report_files(bench):
    out, records = bench
    saved = json.loads((out / "memory.json").read_text())
    assert {(r["variant"], r["k"]) for r in saved["records"]} == set(records)
    table = (out / "memory.md").read_text()
    assert table.count("| 128×128 |") == 3 and "Where the saved bytes go at 128×128" in table
    assert "- 128×128, K=4 (≤ 15%)" in table
    with Image.open(out / "memory.png") as png:
        assert png.format == "PNG" and png.width > 1000


@pytest.mark.parametrize("fold_bn", [False, True])
def test_meter_peak_of_k1_equals_saved_bytes_of_a_plain_forward_and_loss(fold_bn):
    config = StepConfig(128, 160, fold_bn, recompute=False, rfr=True, boundaries=())
    net, image = config.build(), config.image()
    memory = measure_step_memory(net, image)
    reference = saved_tensor_bytes(lambda: F.cross_entropy(net(image)[0], torch.tensor([LABEL])))
    assert memory.saved_bytes == memory.per_module_saved_bytes[0] == reference
    assert memory.left_over_bytes == 0
    breakdown = memory.per_module_breakdown[0]
    assert sum(breakdown.values()) == reference and breakdown[OUTSIDE] < 1024  # hooks found nearly all
    # Unfolded, every trainable BatchNorm saves its input (a conv output); folded, none does.
    bn_inputs = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: bn_inputs.append(args[0].nbytes))
             for m in net.trunk.modules() if isinstance(m, FrozenBatchNorm2d) and m is not net.trunk.bn1]
    with torch.no_grad():
        fold = net.trunk.fold_bn
        net.trunk.fold_bn = False
        net.trunk(image)
        net.trunk.fold_bn = fold
    for hook in hooks:
        hook.remove()
    if fold_bn:
        assert "trunk BatchNorm inputs" not in breakdown
    else:  # plus each BatchNorm's running statistics (buffers, not parameters: the meter counts them)
        buffers = sum(m.running_mean.nbytes + m.running_var.nbytes for m in net.trunk.modules()
                      if isinstance(m, FrozenBatchNorm2d) and m is not net.trunk.bn1)
        assert sum(bn_inputs) <= breakdown["trunk BatchNorm inputs"] <= sum(bn_inputs) + 2 * buffers


def test_rfr_decoders_cost_the_same_at_any_input_size():
    rfr, trunk = [], []
    for side in (192, 256):
        config = step_config(VARIANTS["folded"], 4, (side, side))
        module1 = measure_step_memory(config.build(), config.image()).per_module_breakdown[0]
        rfr.append(module1["RFR decoders"])
        trunk.append(module1["trunk ReLU outputs"])
    assert rfr[0] == rfr[1] > 100 * 2**20  # 10 patches of 132² px, 64 channels: over 100 MiB at any size
    assert trunk[1] / trunk[0] == pytest.approx((256 / 192) ** 2, rel=0.05)


def test_recompute_keeps_block_inputs_and_bounds_the_rebuilt_block():
    hw = (128, 128)
    plain, recomputed = (step_config(VARIANTS[name], 1, hw) for name in ("folded", "recompute"))
    saved_plain = measure_step_memory(plain.build(), plain.image()).saved_bytes
    net = recomputed.build()
    memory = measure_step_memory(net, recomputed.image())
    assert "trunk block inputs kept for recomputation" in memory.per_module_breakdown[0]
    bound = recompute_bound_bytes(net, memory.per_module_saved_bytes, hw)
    assert memory.saved_bytes < bound < saved_plain


def test_balanced_split_is_the_one_localnet_chooses():
    config = step_config(VARIANTS["balanced-recompute"], 4, (256, 256))
    assert config.recompute and config.fold_bn and len(config.boundaries) == 3
    # At small inputs the RFR decoders dominate; the shallow ones are the dearest, so module 1 grows deep.
    assert config.boundaries[0] > block_boundaries(4)[0]


def _record(side, variant="folded", k=4, balanced=False, fixed=1000):
    area = side * side
    per_module = [fixed + 3 * area, 5000 + area]
    return {"variant": variant, "k": k, "height": side, "width": side, "balanced": balanced,
            "per_module_saved_bytes": per_module, "saved_bytes": max(per_module)}


def test_projection_is_exact_for_bytes_linear_in_area():
    records = [_record(100), _record(200), _record(400), _record(200, "balanced", balanced=True),
               _record(400, "balanced", balanced=True)]
    projected = project_saved_bytes(records, 1000 * 1000)
    assert projected == {("folded", 4): pytest.approx(1000 + 3e6)}  # balanced: split depends on size
    table = format_projection(records + [_record(side, "paper", 1, fixed=10) for side in (100, 200, 400)])
    paper_k1 = 10 + 3 * 8698 * 7496
    assert f"| folded | 4 | {100 * (1000 - 10 + paper_k1) / paper_k1:.1f} % |" in table
    assert "off by at most 0.0 %" in table
    # Not linear (e.g. RFR patches clipped on the smallest map): checked, and no projection shown.
    bent = [_record(100, fixed=6000), _record(200), _record(400)]
    paper = [_record(side, "paper", 1) for side in (100, 200, 400)]
    assert format_projection(bent + paper).startswith("No projection")


def test_arguments_and_errors():
    parser = argparse.ArgumentParser()
    add_memory_arguments(parser)
    args = parser.parse_args(["--out", "x", "--sizes", "1024", "3000x2000", "--k", "1", "4", "--quick"])
    assert args.sizes == [(1024, 1024), (2000, 3000)] and args.k == [1, 4] and args.quick
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--sizes", "32"])
    with pytest.raises(ConfigError, match=r"unknown variant\(s\) \['fast'\]"):
        run_memory_benchmark("unused", variants=("fast",))
    assert parser.parse_args(["--out", "x", "--stream-store", "memory"]).stream_store == "memory"
    assert parser.parse_args(["--out", "x"]).stream_store is None  # the device's default store
    with pytest.raises(ConfigError, match="stream_store must be 'disk' or 'memory', got 'ram'"):
        run_memory_benchmark("unused", stream_store="ram")
    assert "failed: boom" in format_memory_table([{"variant": "paper", "k": 1, "height": 64, "width": 64,
                                                  "error": "boom"}])


@pytest.mark.parametrize("arch, boundaries", [("resnet18", [3, 5, 7]), ("resnet50", [3, 6, 11])])
def test_arch_is_measured_with_its_own_split_and_reference(module_tmp, arch, boundaries):
    out = module_tmp(f"bench_{arch}")
    records = {(r["variant"], r["k"]): r for r in run_memory_benchmark(
        out, sizes=((128, 128),), ks=(4,), variants=("folded",), repeats=0, rfr=False, progress=False, arch=arch)}
    four, one = records[("folded", 4)], records[("folded", 1)]
    assert {r["arch"] for r in records.values()} == {arch} and four["boundaries"] == boundaries
    config = StepConfig(128, 128, True, False, False, tuple(boundaries), arch=arch)
    net = config.build()
    assert net.trunk.arch.name == arch
    assert four["saved_bytes"] == measure_step_memory(net, config.image()).saved_bytes  # the child built the same
    assert four["ratio_saved"] == four["saved_bytes"] / one["saved_bytes"] < 1
    assert f"| 128×128 | {arch} | folded | 4 |" in (out / "memory.md").read_text()


def test_memory_plot_legend_names_where_streamed_maps_waited():
    from wsilocal.bench.plots import memory_line_label

    records = [{"variant": "streaming", "k": 4, "store": "memory"}, {"variant": "streaming", "k": 4, "store": None},
               {"variant": "streaming", "k": 1, "store": None}, {"variant": "paper", "k": 4}]
    assert memory_line_label(records, "streaming", 4) == "streaming K=4 (maps in memory)"
    assert memory_line_label(records, "streaming", 1) == "streaming K=1"  # StreamingCNN keeps no maps
    assert memory_line_label(records, "paper", 4) == "paper K=4"
