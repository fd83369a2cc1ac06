"""`wsilocal bench speed`: a tiny end-to-end run, the tile pipeline against `wsilocal features`, bfloat16."""

import json
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from wsilocal.bench import speed
from wsilocal.bench.commands import BENCHMARKS
from wsilocal.cli import build_parser
from wsilocal.errors import ConfigError
from wsilocal.features.extract import extract_features
from wsilocal.features.h5 import read_features
from wsilocal.infer import prediction as prediction_module
from wsilocal.infer.predict import Predictor
from wsilocal.slide.cohort import CohortSlide
from wsilocal.slide.reader import open_slide
from wsilocal.stream.bands import DEFAULT_BAND

SIZE = (256, 320)  # (height, width) at 5x: one 256-px tile fits the tissue box
SMALL = (96, 128)  # for bfloat16, emulated (slow) on CPUs without it, and the memory children


@pytest.fixture(scope="module")
def bench(module_tmp):
    """One size, one round, in a child process as the command runs it (bfloat16 and RSS are tested below)."""
    out = module_tmp("speed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the child: one thread on the shared test machine
        report = speed.run_speed_benchmark(out, sizes=[SIZE], repeats=1, workers=1, batch_size=4, bf16=False,
                                           rss=False, progress=False)
    return out, report


@pytest.fixture(scope="module")
def predictor():
    return speed.build_predictor("cpu")


@pytest.fixture(scope="module")
def slide(bench):
    out, _ = bench
    return speed.bench_slide(out / "slides", *SIZE)  # the file the benchmark wrote, reused


@pytest.fixture(scope="module")
def small_slide(bench):
    out, _ = bench
    return speed.bench_slide(out / "slides", *SMALL)


def test_record_fields_medians_and_ratio(bench, slide):
    out, report = bench
    [r] = report["records"]
    assert (r["height"], r["width"]) == SIZE and r["requested"] == list(SIZE)  # ours processed the whole box
    assert r["slide"] == str(slide) and r["threads"] == 1 and r["ours_mode"] == "whole"
    assert len(r["ours_runs"]) == len(r["pipeline_runs"]) == 1
    assert r["ours_s"] == statistics.median(r["ours_runs"]) > 0
    assert r["pipeline_s"] == statistics.median(r["pipeline_runs"]) > 0
    assert r["ratio"] == r["pipeline_s"] / r["ours_s"]
    assert list(r["ours_stages"]) == list(speed.OURS_STAGES)
    assert list(r["pipeline_stages"]) == list(speed.PIPELINE_STAGES)
    for method in ("ours", "pipeline"):  # the stages account for the total (one run: medians are that run)
        assert 0.8 * r[f"{method}_s"] <= sum(r[f"{method}_stages"].values()) <= r[f"{method}_s"]
    assert r["n_tiles"] == 1 and r["bf16"] is None and r["rss"] == {}
    assert report["bf16"]["max_prob_diff"] is None and report["settings"]["repeats"] == 1
    assert json.loads((out / "speed.json").read_text()) == report


def test_report_files(bench):
    out, _ = bench
    table = (out / "speed.md").read_text()
    assert "| 320×256 | resnet34 | 1 |" in table and "| 320×256 | pipeline |" in table
    assert "bfloat16: not measured." in table
    with Image.open(out / "speed.png") as png:
        assert png.format == "PNG" and png.size[0] > 500


def test_slide_is_a_reusable_aperio_file_at_the_scan_resolution(bench, slide):
    out, _ = bench
    mtime = slide.stat().st_mtime_ns
    assert speed.bench_slide(out / "slides", *SIZE) == slide and slide.stat().st_mtime_ns == mtime
    with open_slide(slide) as handle:
        assert handle.backend == "openslide" and handle.vendor == "aperio" and handle.mpp == speed.SCAN_MPP
        assert handle.level_dimensions[0] == (640, 512)  # SIZE at 2 µm/px from 1 µm/px


def test_pipeline_equals_the_features_command_and_gated_abmil(slide, tmp_path):
    extractor, mil = speed.build_pipeline(torch.device("cpu"))
    result = speed.run_tile_pipeline(slide, extractor, mil, tmp_path, batch_size=4, workers=1)
    done = extract_features([CohortSlide("s", slide, "a", "test", "s")], tmp_path / "features", batch_size=4,
                            device="cpu", progress=False)
    features, coords, _ = read_features(done.written["s"])
    with torch.no_grad():
        expected = torch.softmax(mil(torch.from_numpy(features)).logits, dim=1)[0].numpy()
    assert result["n_tiles"] == len(coords) == 1
    np.testing.assert_allclose(result["probabilities"], expected, atol=1e-6)


def test_bf16_predictions_are_close_to_float32(predictor, small_slide):
    bf16 = speed.bfloat16_copy(predictor)
    assert bf16.trunk.conv1.weight.dtype == torch.bfloat16 and bf16.head.classifier[0].weight.dtype == torch.float32
    assert predictor.trunk.conv1.weight.dtype == torch.float32  # the original is untouched
    result = {"ours": [speed.run_ours(predictor, small_slide)], "bf16": [speed.run_ours(bf16, small_slide)]}
    summary = speed.bf16_summary(result)
    assert summary["max_prob_diff"] == max(abs(a - b) for a, b in zip(result["ours"][0]["probabilities"],
                                                                      result["bf16"][0]["probabilities"], strict=True))
    assert 0 < summary["max_prob_diff"] <= speed.BF16_TOLERANCE and summary["within_tolerance"]
    assert summary["speedup"] == summary["float32_s"] / summary["bf16_s"]


def test_whole_and_streamed_memory_measurements(predictor, small_slide):
    """The streamed forward is measured at the band a prediction streams with (not the smallest), and the
    predictor's own budget and band are left as they were."""
    settings = predictor.memory_budget, predictor.band
    whole, streamed = (speed.measure_memory(predictor, small_slide, forward) for forward in ("whole", "streamed"))
    assert (predictor.memory_budget, predictor.band) == settings
    assert (whole["mode"], streamed["mode"]) == ("whole", "streamed")
    assert (whole["band"], streamed["band"]) == (None, DEFAULT_BAND)
    for m in (whole, streamed):
        assert 0 < m["added_bytes"] < m["peak_rss_bytes"] and m["seconds"] > 0


def test_timed_rounds_of_ours_do_not_reset_the_memory_meter(predictor, slide, tmp_path, monkeypatch):
    """The meter's reset (garbage collection, malloc_trim, clear_refs) hands the freed heap back to the OS, so the
    next prediction page-faults its activations in again. The pipeline's rounds never reset: ours' timed rounds
    must not either. The memory measurement still resets, once per prediction, and measures."""
    calls = {"trim": 0, "reset": 0}
    trim_heap, reset = prediction_module.trim_heap, prediction_module.PeakMemory.reset

    def counted_trim():
        calls["trim"] += 1
        trim_heap()

    def counted_reset(meter):
        calls["reset"] += 1
        reset(meter)

    monkeypatch.setattr(prediction_module, "trim_heap", counted_trim)
    monkeypatch.setattr(prediction_module.PeakMemory, "reset", counted_reset)
    timing = speed._child_time({"device": "cpu", "run": None, "slide": str(slide), "scratch": str(tmp_path),
                                "repeats": 1, "bf16": False, "workers": 1, "batch_size": 4})
    assert len(timing["runs"]["ours"]) == len(timing["runs"]["pipeline"]) == 1
    assert calls == {"trim": 0, "reset": 0}  # warm-up and timed round alike
    assert timing["runs"]["ours"][0]["peak_memory_bytes"] is None  # not measured there
    memory = speed.measure_memory(predictor, slide, "whole")
    assert calls == {"trim": 1, "reset": 1} and memory["added_bytes"] > 0


def test_tables_show_rss_and_the_bf16_verdict(bench):
    _, report = bench
    rss = {"whole": {"peak_rss_bytes": 900 * speed.MiB, "added_bytes": 300 * speed.MiB, "seconds": 1.5},
           "streamed": {"peak_rss_bytes": 700 * speed.MiB, "added_bytes": 100 * speed.MiB, "seconds": 2.5}}
    record = {**report["records"][0], "rss": rss}
    probe = {"height": 64, "width": 64, "float32_s": 0.5, "bf16_s": 10.0, "speedup": 0.05, "max_prob_diff": 0.02}
    table = speed.format_speed_tables(speed._report([record], probe, native=False, settings={}))
    assert "| 320×256 | 900 | 300 | 1.50 | 700 | 100 | 2.50 |" in table
    assert "one run on a 64×64 probe slide took 10.0 s against 0.50 s in float32 (0.050×" in table
    assert "0.0200, **above** the 0.01 tolerance: not offered" in table


def test_whole_forward_above_the_memory_budget_is_skipped_and_reported(bench, monkeypatch):
    """At a size whose whole-image forward the default budget refuses (a prediction would stream it), the benchmark
    does not force it: the record says why, and the table and plot leave its cells empty."""
    cpu = torch.device("cpu")
    need = speed.whole_forward_bytes(speed.ResNetTrunk(arch="resnet34"), 2000, 3000)
    monkeypatch.setattr(speed, "default_memory_budget", lambda device: need)
    assert speed.whole_forward_skip("resnet34", 2000, 3000, cpu) is None  # exactly the budget: it fits
    monkeypatch.setattr(speed, "default_memory_budget", lambda device: need - 1)
    skip = speed.whole_forward_skip("resnet34", 2000, 3000, cpu)
    assert skip["estimate_bytes"] == need and skip["budget_bytes"] == need - 1
    assert skip["skipped"].startswith("not run: the whole-image forward needs about")
    out, report = bench
    streamed = {"peak_rss_bytes": 700 * speed.MiB, "added_bytes": 100 * speed.MiB, "seconds": 2.5}
    record = {**report["records"][0], "rss": {"whole": skip, "streamed": streamed}}
    table = speed.format_speed_tables(speed._report([record], None, native=False, settings={}))
    assert "| 320×256 | — | — | — | 700 | 100 | 2.50 |" in table
    assert f"320×256, whole forward: {skip['skipped']}." in table
    speed.plot_speed([record], out / "skipped.png")  # the streamed point only
    assert (out / "skipped.png").stat().st_size > 0


def test_arguments_and_errors():
    args = build_parser().parse_args(["bench", "speed", "--out", "x", "--sizes", "1024", "3000x2000", "--no-bf16"])
    assert args.sizes == [(1024, 1024), (2000, 3000)] and args.no_bf16 and args.func == BENCHMARKS["speed"].run
    assert BENCHMARKS["speed"].load() is speed.speed_main
    assert args.repeats == 3 and args.workers == speed.WORKERS and not args.quick
    predict = build_parser().parse_args(["predict", "--run", "r", "--out", "o", "a.svs", "--bf16"])
    assert predict.bf16
    with pytest.raises(ConfigError, match="repeats must be >= 1"):
        speed.run_speed_benchmark("unused", repeats=0)
    with pytest.raises(ConfigError, match=r"scan_mpp must be in \(0, 2.0\]"):
        speed.run_speed_benchmark("unused", scan_mpp=4.0)
    with pytest.raises(ConfigError, match="inference dtype must be one of"):
        Predictor(*[None] * 6, device=torch.device("cpu"), dtype=torch.float16)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "speed", "--out", "x", "--sizes", "32"])


def test_arch_sets_the_backbone_of_both_contenders(module_tmp):
    """--arch resnet50: ours and the pipeline's extractor both ResNet50 (2048-d tile features), named in the row."""
    out = module_tmp("speed_resnet50")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        report = speed.run_speed_benchmark(out, sizes=[SIZE], repeats=1, workers=0, batch_size=4, bf16=False,
                                           rss=False, progress=False, arch="resnet50")
    [r] = report["records"]
    assert r["arch"] == report["settings"]["arch"] == "resnet50" and r["n_tiles"] >= 1
    assert f"| {SIZE[1]}×{SIZE[0]} | resnet50 | {r['n_tiles']} |" in (out / "speed.md").read_text()
    extractor, mil = speed.build_pipeline(torch.device("cpu"), 3, "resnet50")
    predictor = speed.build_predictor("cpu", arch="resnet50")
    assert extractor.dim == mil.in_dim == predictor.trunk.out_channels == 2048
