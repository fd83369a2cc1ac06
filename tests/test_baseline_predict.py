"""`wsilocal predict` and heatmaps on tile-based MIL baseline runs: the same features as `wsilocal features`, the
same probabilities as `wsilocal evaluate`, the recorded extractor enforced, and tile attention on an exact grid."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from wsilocal.cli import main
from wsilocal.config import BaselineConfig
from wsilocal.errors import WsilocalError
from wsilocal.features.extract import FeatureExtractor, extraction_settings
from wsilocal.features.h5 import read_attrs, read_features, write_features
from wsilocal.infer.baseline_predict import BaselinePredictor, run_feature_settings
from wsilocal.infer.heatmap import cell_edges, high_attention_cells, save_heatmap, tile_attention_map
from wsilocal.infer.load import load_predictor
from wsilocal.infer.predict import predict_slides
from wsilocal.models.mil import build_mil_model
from wsilocal.slide.reader import open_slide
from wsilocal.slide.tiff_writer import write_pyramidal_tiff
from wsilocal.train.baseline import load_baseline_run, train_baseline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Slides at 1 µm/px; tiles of 32 px at 2 µm/px are 64 level-0 px.
SLIDE_MPP, TILE0 = 1.0, 64
GLASS, STROMA, NUCLEUS = (242, 240, 243), (226, 150, 196), (112, 62, 150)
TISSUE = (128, 160, 640, 448)  # x, y, w, h of the stained area in level-0 px
LESION = (384, 320, 192, 128)  # a patch of crowded nuclei inside it
SPLITS = [("s0", "a", "train"), ("s1", "b", "train"), ("s2", "a", "val"), ("s3", "b", "val"),
          ("s4", "a", "test"), ("s5", "b", "test")]


def tissue_image(seed: int, lesion: bool) -> np.ndarray:
    """1024×768 px: glass, a stroma rectangle dotted with nuclei (15 %), optionally a lesion crowded with them
    (70 %)."""
    rng = np.random.default_rng(seed)
    image = np.empty((768, 1024, 3), np.float32)
    image[:] = GLASS
    for (x, y, w, h), share in [(TISSUE, 0.15), *([(LESION, 0.7)] if lesion else [])]:
        patch = image[y : y + h, x : x + w]
        patch[:] = STROMA
        patch[rng.random((h, w)) < share] = NUCLEUS
    image += rng.standard_normal((768, 1024, 1), dtype=np.float32) * 2.0
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run(module_tmp) -> SimpleNamespace:
    """Six slides, `wsilocal features` (random extractor, 32-px tiles), an ABMIL baseline (2 epochs), evaluated."""
    root = module_tmp("baseline_predict")
    slides = {}
    for i, (slide_id, label, _) in enumerate(SPLITS):
        slides[slide_id] = root / f"{slide_id}.svs"
        write_pyramidal_tiff(slides[slide_id], tissue_image(i, label == "b"), mpp=SLIDE_MPP)
    cohort = root / "cohort.csv"
    cohort.write_text("slide_id,path,label,split\n" + "".join(f"{s},{s}.svs,{c},{p}\n" for s, c, p in SPLITS))
    features, run_dir = root / "features", root / "run"
    assert main(["features", "--cohort", str(cohort), "--out", str(features), "--tile", "32"]) == 0
    assert main(["baseline", "--model", "abmil", "--cohort", str(cohort), "--features", str(features), "--out",
                 str(run_dir), "--epochs", "2", "--min-epochs", "0", "--threads", "1"]) == 0
    assert main(["evaluate", str(run_dir), "--split", "test"]) == 0
    return SimpleNamespace(root=root, slides=slides, cohort=cohort, features=features, dir=run_dir)


def copy_run(run, tmp_path: Path, edit_meta=None) -> Path:
    """A copy of the run directory whose model.json went through ``edit_meta(meta)``."""
    copy = tmp_path / "run_copy"
    shutil.copytree(run.dir, copy)
    if edit_meta is not None:
        meta = json.loads((copy / "model.json").read_text())
        edit_meta(meta)
        (copy / "model.json").write_text(json.dumps(meta))
    return copy


def test_the_run_records_how_its_features_were_made(run):
    meta = json.loads((run.dir / "model.json").read_text())
    attrs = read_attrs(run.features / "s0.h5")
    assert meta["features"] == extraction_settings(attrs)
    assert meta["features"] == {"mpp": 2.0, "tile": 32, "min_tissue": 0.25, "assume_mpp": None, "mask_mpp": 16.0,
                                "extractor": FeatureExtractor().description, "weights": "", "arch": "resnet34",
                                "format_version": 1}
    assert "random init seed 0" in meta["features"]["extractor"]


def test_predictor_features_and_probabilities_equal_features_and_evaluate(run):
    predictor = load_predictor(run.dir)
    assert isinstance(predictor, BaselinePredictor) and predictor.classes == ["a", "b"]
    with open(run.dir / "predictions_test.csv") as handle:
        evaluated = {row["slide_id"]: row for row in csv.DictReader(handle)}
    assert sorted(evaluated) == ["s4", "s5"]
    _, model, _ = load_baseline_run(run.dir)
    for slide_id, row in evaluated.items():
        stored, stored_coords, attrs = read_features(run.features / f"{slide_id}.h5")
        with open_slide(run.slides[slide_id]) as slide:
            coords, features, tile0 = predictor.bag(slide)
        np.testing.assert_array_equal(coords, stored_coords)  # the same tiles, in the same order
        np.testing.assert_allclose(features, stored, rtol=1e-5, atol=1e-5 * np.abs(stored).max())
        assert tile0 == attrs["tile_level0"] == TILE0 and len(coords) >= 40

        prediction = predictor.predict(run.slides[slide_id], heatmap=True)
        probabilities = np.array(list(prediction.probabilities.values()))
        np.testing.assert_allclose(probabilities, [float(row["p_a"]), float(row["p_b"])], atol=1e-5)
        with torch.no_grad():
            reference = model(torch.from_numpy(stored))
        np.testing.assert_allclose(probabilities, torch.softmax(reference.logits, 1)[0].numpy(), atol=1e-6)
        assert prediction.predicted == row["predicted"] and prediction.mode == "tiles"
        # Each tile's attention sits in the grid cell of its level-0 corner; the cells without a tile are NaN.
        table = np.loadtxt(run.dir / "attention_test" / f"{slide_id}.csv", delimiter=",", skiprows=1)
        np.testing.assert_array_equal(table[:, :2], coords)
        x0, y0 = prediction.cell_origin
        rows, cols = ((coords[:, 1] - y0) // TILE0).astype(int), ((coords[:, 0] - x0) // TILE0).astype(int)
        np.testing.assert_allclose(prediction.attention[rows, cols], table[:, 2], rtol=1e-4)
        assert np.isnan(prediction.attention).sum() == prediction.attention.size - len(coords)
        assert np.nansum(prediction.attention) == pytest.approx(1.0, abs=1e-5)


def test_cli_predict_on_a_baseline_run_and_evaluate_heatmaps_agree(run, tmp_path, capsys):
    out = tmp_path / "pred"
    missing = tmp_path / "gone.svs"
    code, stdout, stderr = call(["predict", "--run", str(run.dir), str(run.slides["s4"]), str(run.slides["s5"]),
                                 str(missing), "--out", str(out), "--heatmap"], capsys)
    assert code == 1, stderr  # one slide skipped
    assert "2 predicted, 1 skipped" in stdout and f"skipped gone: {missing}: file not found" in stdout
    with open(out / "predictions.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["slide_id", "path", "predicted", "p_a", "p_b", "seconds", "peak_memory_mb", "mode"]
    assert [(r[0], r[-1]) for r in rows[1:]] == [("s4", "tiles"), ("s5", "tiles")]
    with open(out / "skipped.csv") as handle:
        assert list(csv.reader(handle)) == [["slide_id", "path", "reason"], ["gone", str(missing),
                                                                              f"{missing}: file not found"]]
    assert sorted(p.name for p in out.glob("s4_*")) == ["s4_attention.geojson", "s4_attention.json",
                                                         "s4_attention.npy", "s4_heatmap.png"]

    code, stdout, _ = call(["evaluate", str(run.dir), "--split", "test", "--heatmap"], capsys)
    assert code == 0 and f"heatmaps of 2 slides → {run.dir / 'heatmaps_test'}" in stdout
    for slide_id in ("s4", "s5"):
        predicted = np.load(out / f"{slide_id}_attention.npy")
        evaluated = np.load(run.dir / "heatmaps_test" / f"{slide_id}_attention.npy")
        np.testing.assert_allclose(evaluated, predicted, rtol=1e-4, equal_nan=True)
        sidecars = [json.loads(p.read_text()) for p in (out / f"{slide_id}_attention.json",
                                                       run.dir / "heatmaps_test" / f"{slide_id}_attention.json")]
        for key in ("bbox", "map_shape", "cell_origin", "cell_size", "column_edges", "row_edges", "empty_cells"):
            assert sidecars[0][key] == sidecars[1][key], key
        assert sidecars[0]["attention_is_softmax"] is True and sidecars[0]["cell_size"] == [TILE0, TILE0]


def test_main_method_options_and_evaluate_heatmap_are_refused_where_they_do_not_apply(run, tmp_path, capsys):
    code, _, stderr = call(["predict", "--run", str(run.dir), str(run.slides["s4"]), "--out", str(tmp_path),
                            "--memory-budget-gb", "1", "--bf16"], capsys)
    assert code == 2 and stderr == (f"error: {run.dir} is a tile-based MIL baseline run: --memory-budget-gb, --bf16 "
                                    "apply only to runs of the method (a baseline reads its tiles one batch at a "
                                    "time)\n")
    main_run = tmp_path / "main_run"
    main_run.mkdir()
    (main_run / "config.yaml").write_text("method: local\n")
    code, _, stderr = call(["evaluate", str(main_run), "--heatmap"], capsys)
    assert code == 2 and stderr.startswith(f"error: {main_run}: --heatmap draws a baseline run's tile attention")


def test_runs_without_recorded_settings_read_a_feature_file_or_say_why_not(run, tmp_path):
    old = copy_run(run, tmp_path, lambda meta: meta.pop("features"))
    assert run_feature_settings(old) == extraction_settings(read_attrs(run.features / "s0.h5"))
    config = yaml.safe_load((old / "config.yaml").read_text())
    config["features"] = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(WsilocalError) as error:
        BaselinePredictor.from_run(old)
    assert str(error.value) == (f"{old / 'model.json'}: the run does not record how its tile features were made, "
                                f"and no feature file in {tmp_path / 'empty'} does; predict needs features made by "
                                "`wsilocal features`")


@pytest.fixture(scope="module")
def weights_files(module_tmp) -> SimpleNamespace:
    """Two torchvision-named ResNet34 state dicts that differ in one tensor."""
    folder = module_tmp("weights")
    state = FeatureExtractor().trunk.state_dict()
    torch.save(state, folder / "one.pth")
    torch.save({**state, "conv1.weight": state["conv1.weight"] * 1.01}, folder / "two.pth")
    return SimpleNamespace(one=folder / "one.pth", two=folder / "two.pth")


def test_predict_uses_the_weights_file_the_features_were_made_with_and_refuses_another(run, tmp_path, weights_files,
                                                                                        capsys):
    one, two = FeatureExtractor(weights_files.one), FeatureExtractor(weights_files.two)

    def made_with_one(meta):
        meta["features"].update(weights=str(weights_files.one), extractor=one.description)

    pretrained = copy_run(run, tmp_path, made_with_one)
    predictor = BaselinePredictor.from_run(pretrained)
    assert predictor.extractor.weights == weights_files.one
    with pytest.raises(WsilocalError) as error:
        BaselinePredictor.from_run(pretrained, weights=weights_files.two)
    assert str(error.value) == (f"{weights_files.two}: the feature extractor would use weights sha256:"
                                f"{two.weights_sha256}, but the run's features were made with weights sha256:"
                                f"{one.weights_sha256} ({weights_files.one}); give that file with --weights")
    code, _, stderr = call(["predict", "--run", str(pretrained), str(run.slides["s4"]), "--out", str(tmp_path / "o"),
                            "--weights", str(weights_files.two)], capsys)
    assert code == 2 and stderr == f"error: {error.value}\n"
    # A run whose features used random weights refuses a weights file, and the reverse.
    with pytest.raises(WsilocalError, match=r"but the run's features were made with random init seed 0 "
                                            r"\(no weights file\)"):
        BaselinePredictor.from_run(run.dir, weights=weights_files.one)
    moved = tmp_path / "moved.pth"
    shutil.copy(weights_files.one, moved)
    meta = json.loads((pretrained / "model.json").read_text())
    meta["features"]["weights"] = str(tmp_path / "was_here.pth")
    (pretrained / "model.json").write_text(json.dumps(meta))
    with pytest.raises(WsilocalError) as error:
        BaselinePredictor.from_run(pretrained)
    assert str(error.value) == (f"{tmp_path / 'was_here.pth'}: feature extractor weights not found (the run's "
                                f"features were made with {tmp_path / 'was_here.pth'}); give the file's current "
                                "path with --weights")
    assert BaselinePredictor.from_run(pretrained, weights=moved).extractor.weights_sha256 == one.weights_sha256


class Darkness(nn.Module):
    """A one-number tile feature: the share of nuclear-dark pixels (red below 170); nuclei crowd the lesion."""

    dim = 1

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return (tiles[..., 0] < 170).float().mean(dim=(1, 2)).unsqueeze(1)


def darkness_abmil() -> nn.Module:
    """ABMIL on the darkness feature with attention score 20·tanh(darkness): the lesion's tiles take it all."""
    model = build_mil_model("abmil", 2, in_dim=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.embedding[0].weight[0, 0] = 1
        model.attention.V[0].weight[0, 0] = 1
        model.attention.w.weight[0, 0] = 20
    return model


SETTINGS = {"mpp": 2.0, "tile": 32, "min_tissue": 0.25, "mask_mpp": 16.0, "assume_mpp": None}


@pytest.fixture(scope="module")
def lesion_slide(module_tmp) -> Path:
    path = module_tmp("lesion") / "lesion.svs"
    write_pyramidal_tiff(path, tissue_image(7, lesion=True), mpp=SLIDE_MPP)
    return path


def test_attention_heatmap_marks_the_lesion_on_the_exact_tile_grid(lesion_slide, tmp_path):
    predictor = BaselinePredictor(darkness_abmil(), Darkness(), ["a", "b"], SETTINGS, device=torch.device("cpu"))
    assert predictor.no_heatmap is None
    prediction = predictor.predict(lesion_slide, heatmap=True)
    with open_slide(lesion_slide) as slide:
        coords, darkness, _ = predictor.bag(slide)
    # Grid placement: the cell whose level-0 edges contain a tile's corner holds that tile's attention.
    xs, ys = cell_edges(prediction)
    scores = np.exp(20 * np.tanh(darkness[:, 0]))
    scores /= scores.sum()
    for (x, y), score in zip(coords, scores, strict=True):
        j, i = np.searchsorted(xs, x, side="right") - 1, np.searchsorted(ys, y, side="right") - 1
        assert xs[j] == x and xs[j + 1] == x + TILE0 and ys[i] == y and ys[i + 1] == y + TILE0
        assert prediction.attention[i, j] == pytest.approx(score, rel=1e-4)
    assert np.isnan(prediction.attention).sum() == prediction.attention.size - len(coords)

    files = save_heatmap(prediction, lesion_slide, tmp_path, mass=0.5)
    assert set(files) == {"png", "attention", "json", "geojson"}  # no evidence maps for a baseline
    features = json.loads(files["geojson"].read_text())["features"]
    assert features and sum(f["properties"]["attention"] for f in features) >= 0.5
    lx, ly, lw, lh = LESION
    high = high_attention_cells(prediction.attention, 0.5)
    assert 1 <= high.sum() <= 6
    for i, j in zip(*np.nonzero(high), strict=True):  # every high-attention tile lies mostly on the lesion
        overlap_x = max(0, min(xs[j + 1], lx + lw) - max(xs[j], lx))
        overlap_y = max(0, min(ys[i + 1], ly + lh) - max(ys[i], ly))
        assert overlap_x * overlap_y >= 0.5 * TILE0 * TILE0, (i, j)
    for feature in features:
        for ring in feature["geometry"]["coordinates"]:
            ring = np.array(ring)
            assert ring[:, 0].min() >= lx - TILE0 and ring[:, 0].max() <= lx + lw + TILE0
            assert ring[:, 1].min() >= ly - TILE0 and ring[:, 1].max() <= ly + lh + TILE0
    sidecar = json.loads(files["json"].read_text())
    assert sidecar["attention_is_softmax"] is True
    assert sidecar["empty_cells"] == int(np.isnan(prediction.attention).sum()) > 0
    assert "evidence" not in sidecar


def test_score_models_draw_their_scores_and_models_without_attention_say_so(lesion_slide, tmp_path, capsys):
    torch.manual_seed(0)
    maxpool = build_mil_model("maxpool", 2, in_dim=1).eval()
    predictor = BaselinePredictor(maxpool, Darkness(), ["a", "b"], SETTINGS, device=torch.device("cpu"))
    prediction = predictor.predict(lesion_slide, heatmap=True)
    with open_slide(lesion_slide) as slide:
        coords, darkness, _ = predictor.bag(slide)
    with torch.no_grad():
        output = maxpool(torch.from_numpy(darkness))
    expected = torch.softmax(output.instance_logits, 1)[:, ["a", "b"].index(prediction.predicted)].numpy()
    grid, origin = tile_attention_map(coords, expected, TILE0)
    assert not prediction.attention_is_softmax and prediction.cell_origin == origin
    np.testing.assert_allclose(prediction.attention, grid, rtol=1e-6, equal_nan=True)
    files = save_heatmap(prediction, lesion_slide, tmp_path)
    assert json.loads(files["json"].read_text())["attention_is_softmax"] is False

    transmil = build_mil_model("transmil", 2, in_dim=1).eval()
    predictor = BaselinePredictor(transmil, Darkness(), ["a", "b"], SETTINGS, device=torch.device("cpu"))
    result = predict_slides(predictor, [("lesion", lesion_slide)], tmp_path / "transmil", heatmap=True,
                            progress=False)
    assert list(result.predictions) == ["lesion"] and not result.skipped
    assert result.warnings == ["no heatmaps written: TransMIL (Shao et al. 2021) gives no per-tile attention or "
                               "score to draw"]
    assert sorted(p.name for p in (tmp_path / "transmil").iterdir()) == ["predictions.csv", "skipped.csv"]


def test_tile_attention_map_places_tiles_and_refuses_other_layouts():
    coords = np.array([[1000, 500], [1128, 500], [1064, 692]])
    grid, origin = tile_attention_map(coords, [0.2, 0.3, 0.5], 64)
    assert origin == (1000, 500) and grid.shape == (4, 3)
    expected = np.full((4, 3), np.nan, np.float32)
    expected[0, 0], expected[0, 2], expected[3, 1] = 0.2, 0.3, 0.5
    np.testing.assert_array_equal(grid, expected)
    assert high_attention_cells(grid, 0.5).tolist() == [[False, False, False]] * 3 + [[False, True, False]]
    with pytest.raises(WsilocalError, match="do not lie on a grid of 64-px tiles"):
        tile_attention_map(coords + [[0, 0], [0, 0], [1, 0]], [0.2, 0.3, 0.5], 64)
    with pytest.raises(WsilocalError, match="two tiles share one grid cell"):
        tile_attention_map(coords[[0, 0]], [0.5, 0.5], 64)


def test_training_on_features_of_mixed_settings_warns_and_records_none(run, tmp_path):
    """One training bag re-extracted with other tiles: the run trains, warns, and records no settings."""
    features = tmp_path / "features"
    shutil.copytree(run.features, features)
    stored, coords, attrs = read_features(features / "s1.h5")
    write_features(features / "s1.h5", stored, coords, {**attrs, "tile": 64, "min_tissue": 0.5})
    result = train_baseline(BaselineConfig(cohort=str(run.cohort), features=str(features), out=str(tmp_path / "r"),
                                           model="meanpool", epochs=1, min_epochs=0, threads=1), progress=False)
    warning = ("the feature files were made with different tile, min_tissue (e.g. s0.h5 and s1.h5): the model "
               "learns from them all, but `wsilocal predict` cannot reproduce mixed features for this run")
    assert result.warnings == [warning]
    assert "features" not in json.loads((tmp_path / "r" / "model.json").read_text())


def read_predictions(path: Path) -> dict[str, list[str]]:
    with open(path, newline="") as handle:
        return {row[0]: row[1:] for row in list(csv.reader(handle))[1:]}


def test_evaluate_on_another_cohort_writes_into_out_and_refuses_features_made_otherwise(run, tmp_path, capsys):
    # An external cohort: the run's test slides, copied and listed in another CSV; their features made anew.
    external = tmp_path / "external"
    external.mkdir()
    rows = [(s, c) for s, c, p in SPLITS if p == "test"]
    for slide_id, _ in rows:
        shutil.copy(run.slides[slide_id], external / f"{slide_id}.svs")
    csv_path = external / "cohort.csv"
    csv_path.write_text("slide_id,path,label,split\n" + "".join(f"{s},{s}.svs,{c},test\n" for s, c in rows))
    features = external / "features"
    assert main(["features", "--cohort", str(csv_path), "--out", str(features), "--tile", "32"]) == 0
    own = read_predictions(run.dir / "predictions_test.csv")
    own_mtime = (run.dir / "predictions_test.csv").stat().st_mtime_ns
    code, out, _ = call(["evaluate", str(run.dir), "--cohort", str(csv_path), "--features", str(features),
                         "--out", str(tmp_path / "eval")], capsys)
    assert code == 0 and f"wrote {tmp_path / 'eval' / 'metrics_test.json'}" in out
    # The same slides and features: the same probabilities as the run's own evaluation; the run's files untouched.
    assert read_predictions(tmp_path / "eval" / "predictions_test.csv") == own
    assert (run.dir / "predictions_test.csv").stat().st_mtime_ns == own_mtime
    metrics = json.loads((tmp_path / "eval" / "metrics_test.json").read_text())
    assert metrics["cohort"] == str(csv_path) and metrics["n"] == 2
    assert (tmp_path / "eval" / "roc_test.png").is_file() and (tmp_path / "eval" / "attention_test").is_dir()

    other = external / "features32"  # tiles of another size: not what the model learnt from
    assert main(["features", "--cohort", str(csv_path), "--out", str(other), "--tile", "64"]) == 0
    code, _, err = call(["evaluate", str(run.dir), "--cohort", str(csv_path), "--features", str(other),
                         "--out", str(tmp_path / "eval2")], capsys)
    assert code == 2 and err == (f"error: {other}: made with other tile than {run.dir}'s features "
                                 "(tile 64, the run's 32)\n")
    code, _, err = call(["evaluate", str(run.dir), "--cohort", str(csv_path), "--out", str(tmp_path / "e3")],
                        capsys)
    assert code == 2 and err.startswith(f"error: {csv_path}: a baseline run evaluated on another cohort needs "
                                        "that cohort's tile features (--features DIR")
    code, _, err = call(["evaluate", str(run.dir), "--cohort", str(csv_path)], capsys)
    assert code == 2 and err.startswith(f"error: {csv_path}: evaluating another cohort needs an output folder")
    code, _, err = call(["evaluate", str(run.dir), "--out", str(tmp_path / "e4")], capsys)
    assert code == 2 and err == "error: --out goes with --cohort (another cohort to evaluate on)\n"
