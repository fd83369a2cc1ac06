"""The supervised proxy pretraining (`wsilocal.pretrain.proxy`, `bench accuracy --init proxy`) on a tiny synthetic
context cohort: masks cut to the cached box, cell targets against a hand count, a run whose loss falls and whose
weights every consumer loads, resume equality, reuse, one-line errors, and the benchmark option end to end."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from wsilocal.bench import accuracy
from wsilocal.bench.accuracy import CohortSettings
from wsilocal.errors import ConfigError, TrainingInterrupted
from wsilocal.models.resnet import ResNetTrunk, load_trunk_weights
from wsilocal.prepare.cache import PrepareSettings, prepare_cohort
from wsilocal.pretrain.proxy import (
    FOLLICLE,
    IGNORE,
    LESION,
    LOG_FILE,
    OTHER,
    SUMMARY_FILE,
    ProxyConfig,
    cell_targets,
    load_proxy_slides,
    proxy_pretrain,
    sample_batch,
)
from wsilocal.slide.cohort import load_cohort
from wsilocal.synth.masks import mask_of_region

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ProxyConfig(steps=4, batch_size=2, crop=96, eval_every=2)


@pytest.fixture(scope="module")
def cohort(module_tmp) -> Path:
    """A prepared context cohort of 2 slides per class at the quick benchmark's layout (~450 × 200 px at 4 µm/px)."""
    folder = module_tmp("proxy_cohort")
    settings = CohortSettings("context", slides_per_class=2, mpp=4.0, tile=32, layout_scale=0.25, seed=3,
                              splits=(0.5, 0.0, 0.5))
    csv_path = accuracy.prepare_synthetic_cohort(settings, folder, workers=1, progress=False)
    prepare_cohort(load_cohort(csv_path), folder / "cache", PrepareSettings(mpp=4.0), workers=1, progress=False)
    return folder


def test_mask_of_region_cuts_the_box_before_resizing():
    mask = np.zeros((10, 20), np.uint8)  # one pixel per 4 level-0 px: an 80 × 40 px slide
    mask[6:8, 10:12] = 255
    # the box x 32..64, y 16..40 (level 0) is mask columns 8..16, rows 4..10; at twice that size
    cut = mask_of_region(mask, (32, 16, 32, 24), 4, (16, 12))
    expected = np.kron(mask[4:10, 8:16], np.ones((2, 2), np.uint8))
    assert np.array_equal(cut, expected)


def test_cell_targets_follow_the_shares_of_each_cell():
    labels = torch.zeros(1, 4, 8, dtype=torch.long)  # two 4-px cells side by side
    labels[0, :, :4] = 1  # left: all other tissue ...
    labels[0, :2, :2] = 2  # ... with a quarter lesion (below the 30 % share): other tissue
    labels[0, :3, 4:8] = 3  # right: 12 of 16 follicle
    assert cell_targets(labels, 4).tolist() == [[[OTHER, FOLLICLE]]]
    labels[0, :2, :3] = 2  # 6 of 16 lesion: above 30 %
    labels[0, 3, 4:8] = 0
    assert cell_targets(labels, 4).tolist() == [[[LESION, FOLLICLE]]]
    assert cell_targets(torch.zeros(1, 4, 4, dtype=torch.long), 4).tolist() == [[[IGNORE]]]  # glass


def test_slides_carry_their_cut_masks_and_centred_crops_hold_the_rare_classes(cohort):
    slides = load_proxy_slides(cohort, ("train",))
    assert len(slides) == 2 and all(s.labels.shape == s.image.shape[:2] for s in slides)
    assert all(len(s.lesion) and len(s.follicle) for s in slides)  # each context slide holds A and B
    x, labels = sample_batch(slides, 8, 96, torch.Generator().manual_seed(0))
    assert x.shape == (8, 3, 96, 96) and labels.shape == (8, 96, 96)
    assert all((labels[k] >= 2).any() for k in range(0, 8, 2))  # the centred crops hold lesion or follicle
    again, _ = sample_batch(slides, 8, 96, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


@pytest.fixture(scope="module")
def finished(cohort, module_tmp) -> Path:
    return proxy_pretrain(cohort, None, module_tmp("proxy_run"),
                          replace(TINY, steps=30, batch_size=4, lr=1e-3, eval_every=10), progress=False)


def test_run_learns_and_writes_torchvision_weights_that_the_trunk_loads(finished):
    summary = json.loads((finished.parent / SUMMARY_FILE).read_text())
    assert "SUPERVISED" in summary["what"] and summary["steps"] == 30
    assert summary["held_out_slides"] and set(summary["held_out_slides"]).isdisjoint(summary["train_slides"])
    assert [e["step"] for e in summary["evaluations"]] == [10, 20, 30]
    log = np.loadtxt(finished.parent / LOG_FILE, delimiter=",", skiprows=1)
    assert log[:, 0].tolist() == list(range(1, 31))
    assert log[-8:, 1].mean() < 0.8 * log[:8, 1].mean()  # it learns: from random weights, 30 steps (0.54–0.59×)
    assert (finished.parent / "loss_curve.png").stat().st_size > 0
    state = load_file(str(finished))
    assert "conv1.weight" in state and not any(k.startswith(("heads", "fc")) for k in state)
    loaded = load_trunk_weights(ResNetTrunk(), finished)
    assert loaded.ignored == 0 and not (finished.parent / "checkpoint.pt").exists()


def test_resumed_run_ends_with_the_same_weights_and_a_finished_one_is_reused(cohort, finished, tmp_path):
    with pytest.raises(TrainingInterrupted):
        proxy_pretrain(cohort, None, tmp_path / "resumed", TINY, progress=False, stop_at=2)
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    resumed = proxy_pretrain(cohort, None, tmp_path / "resumed", TINY, progress=False)
    straight = proxy_pretrain(cohort, None, tmp_path / "straight", TINY, progress=False)
    a, b = load_file(str(resumed)), load_file(str(straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = straight.stat().st_mtime_ns
    assert proxy_pretrain(cohort, None, tmp_path / "straight", TINY, progress=False) == straight
    assert straight.stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match=r"proxy\.json: a proxy pretraining with other settings"):
        proxy_pretrain(cohort, None, tmp_path / "straight", replace(TINY, lr=1e-3), progress=False)


def test_bad_input_gives_one_line_errors(cohort, tmp_path):
    with pytest.raises(ConfigError, match=r"synth\.json: not found; proxy pretraining needs a synthetic cohort"):
        proxy_pretrain(tmp_path, None, tmp_path / "out", TINY, progress=False)
    with pytest.raises(ConfigError, match="crop must be a positive multiple of 48"):
        proxy_pretrain(cohort, None, tmp_path / "out", replace(TINY, crop=100), progress=False)


def test_bench_init_proxy_gives_every_method_the_proxy_weights_from_the_given_start(tmp_path):
    from test_bench_accuracy import TINY as BENCH_TINY

    start = tmp_path / "start.safetensors"
    save_file(ResNetTrunk(trainable=True).state_dict(), str(start))
    settings = replace(BENCH_TINY, seeds=1, init="proxy", weights=str(start), proxy_slides_per_class=3,
                       proxy={"steps": 2, "batch_size": 2, "crop": 96, "eval_every": 1})
    report = accuracy.run_accuracy_benchmark(tmp_path / "out", settings, rows=["abmil"], progress=False)
    info = report["tasks"]["morphology"]
    weights = Path(info["weights"])
    assert info["init"] == "proxy" and weights.parent.parent == tmp_path / "out" / "proxy"
    summary = json.loads((weights.parent / SUMMARY_FILE).read_text())
    assert summary["init"] == str(start) and summary["steps"] == 2  # slides narrower than the crop are padded
    proxy_meta = json.loads((tmp_path / "out" / "cohorts" / "morphology-proxy-3" / "synth.json").read_text())
    assert proxy_meta["params"]["seed"] == BENCH_TINY.cohorts[0].seed + accuracy.PROXY_SEED_OFFSET
    assert Path(report["records"][0]["run_dir"]).parts[-4] == f"runs-{accuracy.weights_digest(weights)}"
    assert "SUPERVISED proxy pretraining" in (tmp_path / "out" / "accuracy.md").read_text()
    with pytest.raises(ConfigError, match="unknown proxy setting"):
        accuracy.run_accuracy_benchmark(tmp_path / "out", replace(settings, proxy={"stepz": 2}), rows=["abmil"],
                                        progress=False)
