"""`wsilocal predict`: trunk + H of a run applied to slide files, checked against the cached-image forward."""

import csv
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wsilocal import synth
from wsilocal.cli import main
from wsilocal.config import TrainConfig, save_config
from wsilocal.errors import CheckpointError, SlideError
from wsilocal.infer.predict import Predictor, class_evidence, predict_slides
from wsilocal.models import local_net
from wsilocal.models.resnet import ResNetTrunk, calibrate_batchnorm
from wsilocal.models.split import block_boundaries
from wsilocal.prepare.cache import PrepareSettings, build_entry, channel_stats
from wsilocal.run.directory import model_signature
from wsilocal.slide.cohort import CohortSlide
from wsilocal.slide.reader import open_slide
from wsilocal.slide.tiff_writer import write_pyramidal_tiff
from wsilocal.slide.tissue import detect_tissue, image_tissue_mask
from wsilocal.stream.forward import CPU_STREAM_FROM_PIXELS
from wsilocal.stream.geometry import block_geometry, module_tissue_positions, plan_axis
from wsilocal.stream.sources import to_tensor
from wsilocal.train.checkpoint import load_checkpoint, save_checkpoint
from wsilocal.train.data import CachedSlides
from wsilocal.train.trainer import build_model, evaluate_samples

CLASSES = ["glandular", "solid"]
BIG = 2**40  # a memory budget every test image fits: whole-image forward
TINY = 1  # a memory budget nothing fits: band streaming


def synth_pixels(size: tuple[int, int], seed: int) -> np.ndarray:
    """Level-0 pixels of a small synthetic slide (one tissue piece, no stain variation)."""
    params = synth.SynthParams(classes=2, size=size, seed=seed, tissue_pieces=(1, 1), stain_variation=0.0)
    return synth.render_region(synth.make_slide(params, "solid"), 0, 0, *size)


@pytest.fixture(scope="module")
def run(module_tmp) -> SimpleNamespace:
    """A run directory in the trainer's format (random K=4 model, BatchNorm calibrated) and a slide for it.

    The slide is 2048×1792 px at 0.25 µm/px: about 200 px a side of tissue box at the run's 2 µm/px.
    """
    root = module_tmp("predict")
    pixels = synth_pixels((2048, 1792), seed=1)
    slide = root / "good.svs"
    write_pyramidal_tiff(slide, pixels, mpp=0.25)
    config = TrainConfig(cohort=str(root / "cohort.csv"), out=str(root / "run"), k=4, mpp=2.0)
    (root / "cache").mkdir()
    entry = build_entry(CohortSlide("good", slide, "solid", "test", "good"), root / "cache",
                        PrepareSettings(mpp=config.mpp))
    mean, std = channel_stats([entry])
    torch.manual_seed(0)
    net = build_model(config, len(CLASSES))
    calibrate_batchnorm(net.trunk, [to_tensor(entry.image()[:128, :128], mean, std)])  # a crop is enough
    run_dir = Path(config.out)
    run_dir.mkdir()
    save_config(config, run_dir / "config.yaml")
    (run_dir / "model.json").write_text(json.dumps({"classes": CLASSES, "mean": mean, "std": std,
                                                    "block_boundaries": list(block_boundaries(net.split))}))
    save_checkpoint({"model": net.state_dict(), "signature": model_signature(config, CLASSES), "classes": CLASSES,
                     "mean": mean, "std": std, "config": asdict(config)}, run_dir / "checkpoint_best.pt")
    return SimpleNamespace(root=root, dir=run_dir, slide=slide, entry=entry, pixels=pixels, mean=mean, std=std,
                           net=net.eval())


@pytest.fixture(scope="module")
def reference(run) -> SimpleNamespace:
    """The run's whole LocalNet (as trained and saved) applied to the cached image."""
    net = run.net
    with torch.no_grad():
        features = net.trunk(to_tensor(run.entry.image(), run.mean, run.std))
        logits, attention = net.head(features)
        evidence = class_evidence(net.head, features, attention)
    return SimpleNamespace(probabilities=torch.softmax(logits, 1)[0].numpy(), attention=attention.numpy(),
                           features=features, evidence=evidence.numpy())


@pytest.mark.parametrize("budget, mode", [(BIG, "whole"), (TINY, "streamed")])
def test_prediction_equals_the_cached_image_forward(run, reference, budget, mode):
    # Streamed, in bands of 4 stem rows (24 image rows): the image goes through in several bands.
    band = 4 if mode == "streamed" else None
    assert len(plan_axis(run.entry.height, 4 * 6, block_geometry(ResNetTrunk().blocks()[:1]))) >= 2
    predictor = Predictor.from_run(run.dir, memory_budget=budget, band=band)
    prediction = predictor.predict(run.slide, heatmap=True)
    assert prediction.mode == mode
    assert list(prediction.probabilities) == CLASSES
    np.testing.assert_allclose(list(prediction.probabilities.values()), reference.probabilities, rtol=0, atol=1e-5)
    assert prediction.predicted == CLASSES[int(reference.probabilities.argmax())]
    np.testing.assert_allclose(prediction.attention, reference.attention, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(prediction.evidence, reference.evidence, rtol=1e-4, atol=1e-7)
    # Each cell's evidence is its attention split over the classes.
    np.testing.assert_allclose(prediction.evidence.sum(axis=0), prediction.attention, rtol=1e-5)
    assert prediction.bbox == tuple(run.entry.bbox)
    assert prediction.feature_shape == tuple(reference.features.shape[2:])
    assert prediction.mpp == 2.0 and prediction.seconds > 0 and prediction.peak_memory_bytes > 0
    # Cells are 48 px at 2 µm/px = 384 level-0 px, centred on their receptive fields: the first starts half a
    # cell (minus half a pixel) before the tissue box.
    assert prediction.cell_size == pytest.approx((384, 384), rel=0.01)
    x, y = run.entry.bbox[:2]
    assert prediction.cell_origin == pytest.approx((x - 23.5 * 8, y - 23.5 * 8), abs=8)


def test_a_cpu_prediction_streams_from_a_megapixel_up_even_when_the_whole_image_fits(run, reference):
    predictor = Predictor.from_run(run.dir, memory_budget=BIG, device="cpu")
    assert predictor.stream_from == CPU_STREAM_FROM_PIXELS
    assert predictor.predict(run.slide).mode == "whole"  # this test slide is far below a megapixel at 5x
    predictor.stream_from = 1  # as if it were above: the faster streamed mode, at the default band
    prediction = predictor.predict(run.slide)
    assert prediction.mode == "streamed"
    np.testing.assert_allclose(list(prediction.probabilities.values()), reference.probabilities, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def masked_run(run) -> Path:
    """The same run, its model.json recording that it was trained with the glass masked (``mask_glass``)."""
    folder = run.root / "masked_run"
    shutil.copytree(run.dir, folder)
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "mask_glass": True}))
    return folder


@pytest.mark.parametrize("budget, band, mode", [(BIG, None, "whole"), (TINY, 4, "streamed")])
def test_masked_prediction_equals_the_evaluation_from_the_cache(run, reference, masked_run, budget, band, mode):
    # The mask prediction makes from the slide file is the one the cache stored when it was built.
    with open_slide(run.slide) as slide:
        region = detect_tissue(slide)
        from_file = image_tissue_mask(region, slide.level_dimensions[0], (run.entry.width, run.entry.height))
    cached = run.entry.tissue()
    for name in ("overview", "rows", "cols"):
        np.testing.assert_array_equal(getattr(from_file, name), getattr(cached, name))
    mask = module_tissue_positions(run.net.stages, cached)[-1]
    assert mask.any() and not mask.all()  # the box holds glass

    samples = CachedSlides([run.entry], [1], run.mean, run.std, mask_glass=True)
    evaluation = evaluate_samples(run.net, samples, torch.device("cpu"))
    prediction = Predictor.from_run(masked_run, memory_budget=budget, band=band).predict(run.slide, heatmap=True)
    assert prediction.mode == mode
    probabilities = np.array(list(prediction.probabilities.values()))
    np.testing.assert_allclose(probabilities, evaluation["probabilities"][0], rtol=0, atol=1e-5)
    assert np.abs(probabilities - reference.probabilities).max() > 1e-4  # masking changed the prediction
    assert (prediction.attention[~mask.numpy()] == 0).all() and (prediction.attention[mask.numpy()] > 0).all()
    assert (prediction.evidence[:, ~mask.numpy()] == 0).all()
    np.testing.assert_array_equal(prediction.attended, mask.numpy())  # the heatmap's cells to scale by
    with torch.no_grad():
        _, attention = run.net.head(reference.features, mask)
    np.testing.assert_allclose(prediction.attention, attention.numpy(), rtol=1e-4, atol=1e-7)
    assert not Predictor.from_run(run.dir).mask_glass  # a model.json without the record: no mask, as before


@pytest.mark.parametrize("budget, band, mode", [(BIG, None, "whole"), (TINY, 4, "streamed")])
def test_a_context_head_predicts_as_it_evaluates_whether_glass_was_computed_or_skipped(run, masked_run, budget,
                                                                                        band, mode, tmp_path):
    """H with its context block (``head_context``): read from the run's config, and with glass masked the
    prediction equals the cache's evaluation, whole or streamed (streamed, glass cells are not computed)."""
    import yaml

    folder = tmp_path / "context_run"
    shutil.copytree(masked_run, folder)
    config = TrainConfig(**{**yaml.safe_load((folder / "config.yaml").read_text()), "head_context": 8})
    save_config(config, folder / "config.yaml")
    torch.manual_seed(1)
    net = build_model(config, len(CLASSES))
    net.trunk.load_state_dict(run.net.trunk.state_dict())
    assert net.head.context is not None and "context block" in net.describe()
    state = load_checkpoint(folder / "checkpoint_best.pt")
    save_checkpoint({**state, "model": net.state_dict(), "signature": model_signature(config, CLASSES),
                     "config": asdict(config)}, folder / "checkpoint_best.pt")
    samples = CachedSlides([run.entry], [1], run.mean, run.std, mask_glass=True)
    evaluation = evaluate_samples(net.eval(), samples, torch.device("cpu"))
    prediction = Predictor.from_run(folder, memory_budget=budget, band=band).predict(run.slide, heatmap=True)
    assert prediction.mode == mode
    probabilities = np.array(list(prediction.probabilities.values()))
    np.testing.assert_allclose(probabilities, evaluation["probabilities"][0], rtol=0, atol=1e-5)
    # the evidence of each cell is its attention spread over the classes
    np.testing.assert_allclose(prediction.evidence.sum(0), prediction.attention, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def predictor(run) -> Predictor:
    """The run's predictor, whole-image mode."""
    return Predictor.from_run(run.dir, memory_budget=BIG)


def test_auxiliary_models_are_not_built(run, reference, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inference must not build auxiliary models or the whole LocalNet")

    monkeypatch.setattr(local_net.AuxiliaryModel, "__init__", refuse)
    monkeypatch.setattr(local_net.LocalNet, "__init__", refuse)
    prediction = Predictor.from_run(run.dir, memory_budget=BIG).predict(run.slide)
    np.testing.assert_allclose(list(prediction.probabilities.values()), reference.probabilities, rtol=0, atol=1e-5)
    assert prediction.attention is None and prediction.evidence is None  # maps are kept only for heatmaps


def test_checkpoint_missing_a_head_weight_is_refused(run, tmp_path):
    broken = tmp_path / "run"
    shutil.copytree(run.dir, broken)
    state = load_checkpoint(broken / "checkpoint_best.pt")
    del state["model"]["head.pool.w.weight"]
    save_checkpoint(state, broken / "checkpoint_best.pt")
    with pytest.raises(CheckpointError, match=r"best.pt: does not fit the model: missing head.pool.w.weight"):
        Predictor.from_run(broken)
    with pytest.raises(CheckpointError, match="checkpoint_last.pt: checkpoint not found"):
        Predictor.from_run(run.dir, "last")


@pytest.fixture(scope="module")
def bad_slides(run) -> dict[str, tuple[Path, str]]:
    """Slide id → (file, expected words of the reason) for every way a slide can fail."""
    root = run.root / "bad"
    root.mkdir()
    (root / "text.svs").write_text("not a slide\n")
    truncated = root / "truncated.svs"
    truncated.write_bytes(run.slide.read_bytes()[: run.slide.stat().st_size // 2])
    write_pyramidal_tiff(root / "blank.svs", np.full((1024, 1024, 3), 244, np.uint8), mpp=0.25)
    write_pyramidal_tiff(root / "nompp.tiff", run.pixels[:1024, :1024], mpp=None, layout="generic")
    return {
        "missing": (root / "missing.svs", "file not found"),
        "text": (root / "text.svs", "not a slide format"),
        "truncated": (truncated, "truncated or corrupt"),
        "blank": (root / "blank.svs", "no tissue found"),
        "nompp": (root / "nompp.tiff", "no resolution metadata"),
    }


def test_bad_slides_are_slide_errors_naming_the_file(predictor, bad_slides):
    for path, cause in bad_slides.values():
        with pytest.raises(SlideError) as info:
            predictor.predict(path)
        assert str(info.value).startswith(f"{path}: ") and cause in str(info.value)


def test_predict_slides_skips_bad_slides_and_finishes_good_ones(run, predictor, bad_slides, tmp_path):
    slides = [*((name, path) for name, (path, _) in bad_slides.items()), ("good", run.slide)]
    result = predict_slides(predictor, slides, tmp_path / "out", progress=False)
    assert list(result.predictions) == ["good"]
    assert set(result.skipped) == set(bad_slides)
    with open(tmp_path / "out" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["slide_id", "path", "predicted", "p_glandular", "p_solid", "seconds",
                             "peak_memory_mb", "mode"]
    assert [r["slide_id"] for r in rows] == ["good"]
    for row in rows:
        expected = result.predictions[row["slide_id"]]
        assert row["predicted"] == expected.predicted and row["mode"] == "whole"
        assert float(row["p_solid"]) == pytest.approx(expected.probabilities["solid"], abs=1e-6)
    with open(tmp_path / "out" / "skipped.csv") as handle:
        skipped = {r["slide_id"]: r for r in csv.DictReader(handle)}
    for name, (path, cause) in bad_slides.items():
        assert skipped[name]["path"] == str(path) and cause in skipped[name]["reason"]


def test_cli_predicts_slides_and_exits_1_when_one_was_skipped(run, bad_slides, tmp_path, capsys):
    out = tmp_path / "out"
    nompp = bad_slides["nompp"][0]
    assert main(["predict", "--run", str(run.dir), str(run.slide), str(nompp), "--out", str(out)]) == 1
    table = capsys.readouterr().out
    assert "1 predicted, 1 skipped" in table and f"skipped nompp: {nompp}: no resolution metadata" in table
    row = next(csv.DictReader(open(out / "predictions.csv")))
    assert row["slide_id"] == "good" and row["mode"] == "whole"
    shown = next(line.split() for line in table.splitlines() if line.startswith("good "))
    assert shown[1] == row["predicted"] and float(shown[2]) == pytest.approx(float(row[f"p_{shown[1]}"]), abs=1e-3)
    # The same slide with an assumed resolution, streamed under a budget of about one byte.
    assert main(["predict", "--run", str(run.dir), str(nompp), "--out", str(out), "--assume-mpp", "0.25",
                 "--memory-budget-gb", "1e-9"]) == 0
    row = next(csv.DictReader(open(out / "predictions.csv")))
    assert row["slide_id"] == "nompp" and row["mode"] == "streamed"


def test_cli_cohort_split_and_heatmaps(run, tmp_path, capsys):
    cohort = tmp_path / "cohort.csv"
    shutil.copy(run.slide, tmp_path / "a.svs")
    cohort.write_text("slide_id,path,label,split\nA,a.svs,solid,test\nB,b.svs,glandular,test\n"
                      "C,a.svs,glandular,train\n")
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run.dir), "--cohort", str(cohort), "--split", "test", "--out", str(out),
                 "--heatmap"]) == 1
    captured = capsys.readouterr().out
    assert "1 predicted, 1 skipped" in captured and "skipped B: " in captured and "file not found" in captured
    assert [r["slide_id"] for r in csv.DictReader(open(out / "predictions.csv"))] == ["A"]
    for suffix in ("heatmap.png", "attention.npy", "evidence.npy", "attention.json", "attention.geojson"):
        assert (out / f"A_{suffix}").is_file()
    assert not list(out.glob("C_*"))  # the train split was not asked for


def test_cli_usage_errors_are_one_line(run, tmp_path, capsys):
    assert main(["predict", "--run", str(run.dir), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: give slide files or --cohort CSV")
    assert main(["predict", "--run", str(tmp_path), str(run.slide), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path}: not a run directory (needs config.yaml and model.json)\n"
