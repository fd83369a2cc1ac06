"""`wsilocal pretrain`: the trainable trunk, views, objectives, tile sampling, the run (outputs, resume, DDP, errors)
and the probes of `bench pretrain`."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from wsilocal.bench import pretrain as bench_pretrain
from wsilocal.cli import main
from wsilocal.config import PretrainConfig
from wsilocal.errors import CheckpointError, ConfigError, TrainingInterrupted, WsilocalError
from wsilocal.features.extract import FeatureExtractor
from wsilocal.models.resnet import FrozenBatchNorm2d, ResNetTrunk, load_trunk_weights
from wsilocal.pretrain import augment
from wsilocal.pretrain.objectives import nt_xent, vicreg
from wsilocal.pretrain.tiles import TileSampler, build_tile_index, find_slide_files
from wsilocal.pretrain.trainer import finished_pretraining, learning_rate, pretrain
from wsilocal.synth import synthesize_cohort

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(module_tmp) -> Path:
    """Two classes, three slides each (one per split), 1536² px at 0.25 µm/px: 192² px at 2 µm/px."""
    return synthesize_cohort(module_tmp("pretrain_cohort"), classes=2, slides_per_class=3, size=(1536, 1536),
                             seed=5, progress=False)


def tiny_config(cohort: Path, out: Path, **changes) -> PretrainConfig:
    values = dict(cohort=str(cohort), out=str(out), tile=48, crop=32, steps=4, batch_size=4, warmup_steps=1,
                  projector_dims=[32, 16], bn_tiles=8, checkpoint_every=2, workers=1, min_tissue=0.3)
    return replace(PretrainConfig(), **{**values, **changes})


# --- the network and its views -------------------------------------------------------------------------------


def test_trainable_trunk_has_torchvision_names_and_loads_into_the_frozen_trunk(tmp_path):
    torch.manual_seed(0)
    trainable = ResNetTrunk(conv1_stride=2, trainable=True)
    frozen = ResNetTrunk(conv1_stride=2)
    assert list(trainable.state_dict()) == list(frozen.state_dict())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in trainable.modules())
    assert all(p.requires_grad for p in trainable.parameters())  # the stem and BatchNorms train too
    with torch.no_grad():  # statistics that are not the identity, so a wrong load would show
        for m in trainable.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "w.pth"
    torch.save(trainable.state_dict(), path)
    load_trunk_weights(frozen, path)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    trainable.eval()
    with torch.no_grad():  # float64: the folded BatchNorm rounds differently in float32
        torch.testing.assert_close(frozen.double()(x), trainable.double()(x), rtol=1e-9, atol=1e-9)


def test_full_crop_view_is_one_of_the_eight_flips_and_rotations():
    x = torch.rand(8, 3, 16, 16)
    grid = augment._crop_grids(8, 16, (1.0, 1.0), torch.Generator().manual_seed(3), ratio=(1.0, 1.0))
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    seen = set()
    for k in range(8):
        views = [torch.rot90(x[k], r, dims=(1, 2)) for r in range(4)]
        views += [torch.flip(v, dims=(2,)) for v in views]
        errors = [float((sampled[k] - v).abs().max()) for v in views]
        assert min(errors) < 1e-5  # exactly a dihedral transform of the tile
        seen.add(int(np.argmin(errors)))
    assert len(seen) > 2  # and not always the same one


def test_stain_jitter_of_identity_keeps_the_image_and_shift_moves_haematoxylin():
    x = torch.rand(2, 3, 8, 8) * 0.9 + 0.05
    same = augment.stain_jitter(x, torch.ones(2, 3), torch.zeros(2, 3))
    torch.testing.assert_close(same, x, rtol=1e-5, atol=1e-5)
    more_h = augment.stain_jitter(x, torch.ones(2, 3), torch.tensor([[0.3, 0.0, 0.0]] * 2))
    od_before, od_after = -torch.log(x), -torch.log(more_h)
    added = (od_after - od_before).mean(dim=(0, 2, 3))  # more haematoxylin adds its optical density vector
    torch.testing.assert_close(added / added.norm(), augment.RGB_FROM_HED[0].float(), rtol=1e-3, atol=1e-3)


def test_views_are_reproducible_from_the_generator_and_differ_between_views():
    tiles = torch.randint(0, 255, (3, 48, 48, 3), dtype=torch.uint8)
    aug = augment.Augmentation(crop=32)
    a1, a2 = augment.two_views(tiles, aug, torch.Generator().manual_seed(1))
    b1, b2 = augment.two_views(tiles, aug, torch.Generator().manual_seed(1))
    assert a1.shape == (3, 3, 32, 32)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.allclose(a1, a2)


# --- objectives ----------------------------------------------------------------------------------------------


def test_nt_xent_matches_a_loop_over_views():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    total = 0.0
    for i in range(10):
        partner = (i + 5) % 10
        logits = torch.stack([z[i] @ z[j] / 0.2 for j in range(10) if j != i])
        others = [j for j in range(10) if j != i]
        total += -(logits[others.index(partner)] - torch.logsumexp(logits, 0))
    torch.testing.assert_close(nt_xent(z1, z2, 0.2), total / 10)


def test_vicreg_is_zero_for_equal_decorrelated_spread_views_and_penalises_collapse():
    n, d = 64, 8
    # columns orthogonal with zero mean and std 2: no invariance, variance or covariance penalty
    q, _ = torch.linalg.qr(torch.randn(n, d, dtype=torch.float64))
    centred = q - q.mean(dim=0)
    q, _ = torch.linalg.qr(centred)
    z = q * 2 * math.sqrt(n - 1)
    assert float(vicreg(z, z)) < 1e-3
    collapsed = torch.ones(n, d, dtype=torch.float64)
    assert float(vicreg(collapsed, collapsed)) == pytest.approx(25 * (1 - 1e-2), rel=1e-3)  # std 0 → hinge ~1


def test_learning_rate_warms_up_then_follows_a_half_cosine():
    config = PretrainConfig(cohort="x", out="y", steps=110, warmup_steps=10, lr=1e-3)
    assert learning_rate(config, 0) == pytest.approx(1e-4)
    assert learning_rate(config, 9) == pytest.approx(1e-3)
    assert learning_rate(config, 60) == pytest.approx(0.5e-3)
    assert learning_rate(config, 110) == pytest.approx(0.0, abs=1e-12)


# --- tiles ---------------------------------------------------------------------------------------------------


def test_tile_index_and_sampler_read_tissue_reproducibly(cohort, tmp_path):
    slides = sorted((cohort.parent / "slides").glob("*.svs"))
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"")
    index = build_tile_index([*slides, broken], mpp=2.0, tile=48, min_tissue=0.3, progress=False)
    assert len(index.paths) == len(slides) and index.n_tiles > 0
    assert list(index.skipped) == [str(broken)] and "broken.svs" not in index.skipped[str(broken)].split(":")[0]
    sampler = TileSampler(index, mpp=2.0, tile=48, batch_size=6, seed=1, workers=2)
    again = TileSampler(index, mpp=2.0, tile=48, batch_size=6, seed=1, workers=1)
    other_rank = TileSampler(index, mpp=2.0, tile=48, batch_size=6, seed=1, rank=1)
    try:
        sampler.prefetch(3)
        batch = sampler.batch(3)
        assert batch.shape == (6, 48, 48, 3) and batch.dtype == np.uint8
        assert np.array_equal(batch, again.batch(3))
        assert sampler.placements(3) != other_rank.placements(3)
        assert sampler.placements(3) != sampler.placements(4)
        assert batch.mean() < 235  # tissue, not glass (glass is ~242)
    finally:
        for s in (sampler, again, other_rank):
            s.close()


def test_find_slide_files_by_folder_and_glob(cohort, tmp_path):
    found = find_slide_files(str(cohort.parent / "slides"))
    assert len(found) == 6 and all(p.suffix == ".svs" for p in found)
    assert find_slide_files(str(cohort.parent / "slides" / "synth-000*.svs")) == found
    with pytest.raises(WsilocalError, match="no slide files"):
        find_slide_files(str(tmp_path))


# --- the run -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(cohort, module_tmp) -> Path:
    out = module_tmp("pretrain_run") / "run"
    pretrain(tiny_config(cohort, out), progress=False)
    return out


def test_run_writes_torchvision_weights_that_every_consumer_loads(finished):
    weights = load_file(str(finished / "resnet34.safetensors"))
    assert "conv1.weight" in weights and "layer4.2.bn2.running_var" in weights
    assert not any(k.startswith(("fc.", "projector")) for k in weights)
    trunk = ResNetTrunk(conv1_stride=3)  # the method's stride-3 trunk takes the stride-2 weights
    load_trunk_weights(trunk, finished / "resnet34.safetensors")
    assert torch.equal(trunk.layer2[0].conv1.weight, weights["layer2.0.conv1.weight"])
    extractor = FeatureExtractor(finished / "resnet34.safetensors")
    assert extractor(torch.zeros(1, 64, 64, 3, dtype=torch.uint8)).shape == (1, 512)
    summary = json.loads((finished / "pretrain.json").read_text())
    assert summary["steps"] == 4 and summary["tiles_seen"] == 16 and summary["config"]["objective"] == "vicreg"
    assert summary["slides"] == 4  # train and val only: the test split is left out
    assert (finished / "loss_curve.png").stat().st_size > 0 and not (finished / "checkpoint.pt").exists()
    # BatchNorm re-estimated on plain tiles: no longer the initial identity statistics
    assert not torch.allclose(weights["bn1.running_var"], torch.ones(64))


def test_resumed_run_ends_with_the_same_weights(cohort, finished, tmp_path):
    config = tiny_config(cohort, tmp_path / "resumed")
    with pytest.raises(TrainingInterrupted, match="--resume"):
        pretrain(config, progress=False, stop_at=2)
    with pytest.raises(WsilocalError, match="unfinished pretraining run"):
        pretrain(config, progress=False)
    pretrain(config, resume=True, progress=False)
    a = load_file(str(finished / "resnet34.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "resnet34.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finished_run_is_reused_and_other_settings_are_refused_on_resume(cohort, finished, tmp_path):
    before = (finished / "resnet34.safetensors").stat().st_mtime_ns
    pretrain(tiny_config(cohort, finished), progress=False)
    assert (finished / "resnet34.safetensors").stat().st_mtime_ns == before
    config = tiny_config(cohort, tmp_path / "r")
    with pytest.raises(TrainingInterrupted):
        pretrain(config, progress=False, stop_at=1)
    with pytest.raises(CheckpointError, match="other settings"):
        pretrain(replace(config, lr=0.5), resume=True, progress=False)
    with pytest.raises(WsilocalError, match="finished pretraining with other settings"):
        pretrain(tiny_config(cohort, finished, lr=0.5), progress=False)


def test_finished_run_moved_with_its_cohort_is_reused_and_an_edited_cohort_is_not(cohort, finished, tmp_path):
    """The cohort is part of a run's settings by its CSV's content: a cohort folder and its pretraining hard-linked
    elsewhere are the same run (no pretraining again); a run saved with the cohort's path (before 2026-12-07) still
    matches its own path; a CSV whose rows differ is another cohort."""
    moved = tmp_path / "moved"
    shutil.copytree(cohort.parent, moved / "cohort", copy_function=os.link)
    shutil.copytree(finished, moved / "pretrain", copy_function=os.link)
    before = (moved / "pretrain" / "resnet34.safetensors").stat().st_mtime_ns
    config = tiny_config(moved / "cohort" / cohort.name, moved / "pretrain")
    assert finished_pretraining(moved / "pretrain", config) is not None
    pretrain(config, progress=False)  # reused: nothing written
    assert (moved / "pretrain" / "resnet34.safetensors").stat().st_mtime_ns == before
    summary_file = moved / "pretrain" / "pretrain.json"
    summary = json.loads(summary_file.read_text())
    summary["signature"]["cohort"] = str(cohort)  # as runs before content signatures saved it
    summary_file.unlink()  # a hard link: write a file of its own
    summary_file.write_text(json.dumps(summary))
    assert finished_pretraining(moved / "pretrain", tiny_config(cohort, moved / "pretrain")) is not None
    assert finished_pretraining(moved / "pretrain", config) is None  # by path: another place
    edited = moved / "cohort" / "edited.csv"
    lines = cohort.read_text().splitlines()
    edited.write_text("\n".join(lines[:-1]) + "\n")  # one slide fewer
    assert finished_pretraining(finished, tiny_config(edited, finished)) is None


def test_include_test_adds_the_test_split_and_slides_option_reads_a_folder(cohort, tmp_path):
    from wsilocal.pretrain.trainer import slide_paths

    base = tiny_config(cohort, tmp_path / "o")
    assert len(slide_paths(base)) == 4
    assert len(slide_paths(replace(base, include_test=True))) == 6
    assert len(slide_paths(replace(base, cohort="", slides=str(cohort.parent / "slides")))) == 6


def _two_rank_pretrain(ctx, cohort: Path, out: Path) -> None:
    pretrain(tiny_config(cohort, out, steps=2, checkpoint_every=1), progress=False)


def test_ddp_run_on_two_cpu_processes(cohort, tmp_path):
    from wsilocal.train.distributed import spawn_processes

    spawn_processes(_two_rank_pretrain, 2, (cohort, tmp_path / "ddp"), threads=1)
    summary = json.loads((tmp_path / "ddp" / "pretrain.json").read_text())
    assert summary["processes"] == 2 and summary["tiles_seen"] == 2 * 4 * 2


def test_cli_pretrain_and_its_one_line_errors(cohort, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["pretrain", "--cohort", str(cohort), "--out", str(out), "--tile", "48", "--crop", "32",
                 "--steps", "2", "--batch-size", "4", "--warmup-steps", "1", "--projector-dims", "32", "16",
                 "--bn-tiles", "4", "--workers", "1", "--min-tissue", "0.3"])
    assert code == 0 and (out / "resnet34.safetensors").is_file()
    assert "use with --weights" in capsys.readouterr().out
    assert main(["pretrain", "--out", str(tmp_path / "x")]) == 2
    assert "needs --cohort CSV or --slides" in capsys.readouterr().err
    assert main(["pretrain", "--slides", str(tmp_path / "nothing*.svs"), "--out", str(tmp_path / "y")]) == 2
    assert "no file matches" in capsys.readouterr().err
    assert main(["pretrain", "--cohort", str(cohort), "--out", str(tmp_path / "z"), "--crop", "500"]) == 2
    assert "crop must be in 32..tile" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(tmp_path / "none")]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="objective must be one of simclr, vicreg"):
        PretrainConfig(cohort="c", out="o", objective="byol").validate()
    with pytest.raises(ConfigError, match="batch_size must be >= 2"):
        PretrainConfig(cohort="c", out="o", batch_size=1).validate()


# --- the probes of bench pretrain ----------------------------------------------------------------------------


def test_linear_and_knn_probes_separate_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    y = rng.integers(0, 3, 300)
    x = centres[y] + rng.normal(size=(300, 16))
    predictor = bench_pretrain.fit_linear_probe(x[:200], y[:200], 3, l2=1e-3)
    assert bench_pretrain.balanced_accuracy(predictor(x[200:]), y[200:], 3) > 0.95
    knn = bench_pretrain.knn_predict(x[:200], y[:200], x[200:], 3)
    assert bench_pretrain.balanced_accuracy(knn, y[200:], 3) > 0.95
    noise = rng.normal(size=(300, 16))
    guess = bench_pretrain.fit_linear_probe(noise[:200], y[:200], 3, l2=1e-1)(noise[200:])
    assert bench_pretrain.balanced_accuracy(guess, y[200:], 3) < 0.6


def test_balanced_accuracy_is_mean_recall():
    labels = np.array([0, 0, 0, 1])
    assert bench_pretrain.balanced_accuracy(np.array([0, 0, 1, 1]), labels, 3) == pytest.approx((2 / 3 + 1) / 2)


def test_labelled_tiles_follow_the_generator_masks(cohort):
    tiles = bench_pretrain.labelled_tiles(cohort.parent, mpp=2.0, tile=16, lesion_share=0.5, max_other_per_slide=4)
    meta = json.loads((cohort.parent / "synth.json").read_text())
    assert tiles.classes == [*meta["classes"], "other tissue"]
    from PIL import Image

    for (slide_id, _, split), corners, labels in zip(tiles.slides, tiles.corners, tiles.labels, strict=True):
        info = meta["slides"][slide_id]
        assert split == info["split"] and (labels == len(tiles.classes) - 1).sum() <= 4
        mask = np.asarray(Image.open(cohort.parent / info["mask"]))
        for (x, y), label in zip(corners, labels, strict=True):
            window = mask[y // 32:(y + 128 + 31) // 32, x // 32:(x + 128 + 31) // 32]
            if label == len(tiles.classes) - 1:
                assert not (window == 255).any()
            else:
                assert tiles.classes[label] == info["label"] and (window == 255).mean() >= 0.5


def test_slide_bootstrap_pairs_the_predictors_on_the_same_slides():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 400)
    slides = np.repeat(np.arange(40), 10)
    perfect, noise = labels.copy(), rng.integers(0, 3, 400)
    ci = bench_pretrain.slide_bootstrap({"a": noise, "b": perfect}, labels, slides, 3, resamples=300)
    assert ci["b"] == [1.0, 1.0]
    assert ci["a"][0] < 1 / 3 < ci["a"][1]
    assert ci["b - a"][0] > 0.5
    same = bench_pretrain.slide_bootstrap({"a": noise, "b": noise.copy()}, labels, slides, 3, resamples=100)
    assert same["b - a"] == [0.0, 0.0]


def test_bench_pretrain_end_to_end_writes_its_report_and_reuses_the_pretraining(tmp_path, capsys):
    from wsilocal.bench.accuracy import CohortSettings

    settings = bench_pretrain.PretrainBenchSettings(
        CohortSettings("morphology", slides_per_class=3, mpp=2.0, tile=64, classes=2, size=(2048, 2048)),
        pretrain={"steps": 3, "batch_size": 4, "warmup_steps": 1, "bn_tiles": 8, "tile": 48, "crop": 32,
                  "projector_dims": [32, 16], "workers": 1, "min_tissue": 0.3},
        probe_tile=32, workers=1)
    report = bench_pretrain.run_pretrain_benchmark(tmp_path / "p", settings, accuracy_out=tmp_path / "acc",
                                                   progress=False)
    assert (tmp_path / "acc" / "cohorts" / "morphology" / "cohort.csv").is_file()  # shared with bench accuracy
    weights = Path(report["pretrain_folder"]) / "resnet34.safetensors"
    assert weights.parent.parent == tmp_path / "acc" / "pretrain" and weights.is_file()
    assert report["classes"] == ["glandular", "solid", "other tissue"] and report["pretrain"]["steps"] == 3
    for name in ("random", "pretrained"):
        s = report["scores"][name]
        assert 0 <= s["linear_balanced_accuracy"] <= 1 and 0 <= s["knn_balanced_accuracy"] <= 1
        low, high = report["intervals_95"][f"linear {name}"]
        assert low <= high
    assert report["gain"]["knn_balanced_accuracy"] == pytest.approx(
        report["scores"]["pretrained"]["knn_balanced_accuracy"] - report["scores"]["random"]["knn_balanced_accuracy"])
    for name in ("pretrain.json", "pretrain.md", "pretrain.png"):
        assert (tmp_path / "p" / name).stat().st_size > 0
    assert "Gain of pretraining" in (tmp_path / "p" / "pretrain.md").read_text()
    before = weights.stat().st_mtime_ns
    bench_pretrain.run_pretrain_benchmark(tmp_path / "p", settings, accuracy_out=tmp_path / "acc", progress=False)
    assert weights.stat().st_mtime_ns == before
