"""The MIL baselines' trainer end to end on real HDF5 feature files: learning, run directory, resume, evaluation,
skipped slides and one-line errors."""

import csv
import json

import numpy as np
import pytest
import torch

from wsilocal.cli import main
from wsilocal.config import BaselineConfig, TrainConfig
from wsilocal.errors import CheckpointError
from wsilocal.features.h5 import read_features, write_features
from wsilocal.run.directory import model_signature
from wsilocal.slide.cohort import load_cohort
from wsilocal.train.bags import load_bags
from wsilocal.train.baseline import load_baseline_run, train_baseline
from wsilocal.train.checkpoint import load_checkpoint
from wsilocal.train.evaluate import evaluate_run
from wsilocal.train.trainer import Trainer, build_model

SIGNAL_DIMS = 32  # positive tiles are shifted by +2 on these feature dimensions: an easy, learnable signal


def write_bag(path, seed: int, positive: bool, dim: int = 512) -> None:
    """A synthetic bag: 20–50 tiles of N(0, 1) features; in a tumour bag 2–4 tiles carry the signal."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 50))
    features = rng.standard_normal((n, dim)).astype(np.float32)
    if positive:
        features[rng.choice(n, int(rng.integers(2, 5)), replace=False), :SIGNAL_DIMS] += 2.0
    coords = np.stack([np.arange(n) % 8 * 256, np.arange(n) // 8 * 256], axis=1).astype(np.int64)
    write_features(path, features, coords, {"mpp": 2.0, "tile": 256})


def write_cohort(folder, rows, name="cohort.csv"):
    """A cohort CSV; the slide files it names need not exist (baselines read only the features)."""
    lines = ["slide_id,path,label,split"] + [f"{sid},slides/{sid}.svs,{label},{split}" for sid, label, split in rows]
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


@pytest.fixture(scope="module")
def cohort(module_tmp):
    """8 training, 4 validation and 4 test slides (normal/tumor), plus two training slides without usable features."""
    root = module_tmp("baseline")
    features = root / "features"
    features.mkdir()
    rows = []
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for i in range(n):
            label = ("normal", "tumor")[i % 2]
            sid = f"{split}{i}"
            write_bag(features / f"{sid}.h5", seed=len(rows), positive=label == "tumor")
            rows.append((sid, label, split))
    rows += [("nofeatures", "tumor", "train"), ("corrupt", "normal", "train")]
    (features / "corrupt.h5").write_bytes(b"not an HDF5 file")
    return write_cohort(root, rows), features


@pytest.fixture(autouse=True)
def restore_threads():
    """Runs here use one thread (tiny bags: threads only add overhead); later tests get the default back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def config_for(cohort, out, model, **overrides):
    csv_path, features = cohort
    values = dict(cohort=str(csv_path), features=str(features), out=str(out), model=model, epochs=12,
                  min_epochs=0, seed=1, threads=1)
    values.update(overrides)
    return BaselineConfig(**values)


@pytest.mark.parametrize("model", ["abmil", "clam_sb"])
def test_model_learns_the_cohort_and_evaluate_writes_every_output(cohort, tmp_path, model, capsys):
    run = tmp_path / "run"
    result = train_baseline(config_for(cohort, run, model), progress=False)
    assert result.best_val["balanced_accuracy"] == 1.0, result.history[-1]
    for name in ("config.yaml", "model.json", "checkpoint_last.pt", "checkpoint_best.pt", "metrics.csv",
                 "metrics.json", "curves.png", "train.log", "summary.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "model.json").read_text()) == {
        "method": "baseline", "model": model, "classes": ["normal", "tumor"], "in_dim": 512}
    # Slides without usable features are skipped, each with its reason, and listed — never silently.
    features = cohort[1]
    assert result.skipped == {
        "nofeatures": f"no features file {features / 'nofeatures.h5'} (run `wsilocal features` for this slide)",
        "corrupt": result.skipped["corrupt"]}
    assert result.skipped["corrupt"].startswith(f"{features / 'corrupt.h5'}: not a readable HDF5 file")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped"] == result.skipped and summary["epochs_run"] == 12
    assert f"skipped nofeatures: {result.skipped['nofeatures']}" in summary["warnings"]

    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "test"]) == 0
    assert "balanced accuracy  1.000" in capsys.readouterr().out
    metrics = json.loads((run / "metrics_test.json").read_text())
    assert metrics["balanced_accuracy"] == 1.0 and metrics["n"] == 4 and metrics["checkpoint"] == "best"
    assert (run / "roc_test.png").stat().st_size > 0
    # Predictions and attention equal the best checkpoint's model applied to each bag's features.
    _, net, _ = load_baseline_run(run)
    with open(run / "predictions_test.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["slide_id"] for r in rows] == ["test0", "test1", "test2", "test3"]
    for row in rows:
        feats, coords, _ = read_features(features / f"{row['slide_id']}.h5")
        with torch.no_grad():
            output = net(torch.from_numpy(feats))
        probs = torch.softmax(output.logits, 1)[0].numpy()
        np.testing.assert_allclose([float(row["p_normal"]), float(row["p_tumor"])], probs, atol=1e-6)
        assert row["predicted"] == row["label"] == ("normal", "tumor")[int(row["slide_id"][-1]) % 2]
        table = np.loadtxt(run / "attention_test" / f"{row['slide_id']}.csv", delimiter=",", skiprows=1)
        np.testing.assert_array_equal(table[:, :2], coords)
        np.testing.assert_allclose(table[:, 2], output.attention.numpy(), rtol=1e-5, atol=1e-9)
        assert table[:, 2].sum() == pytest.approx(1.0, abs=1e-4)  # softmax attention over the bag's tiles


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(cohort, tmp_path):
    # CLAM-SB draws dropout masks and, with max_instances, tile subsets: both must replay exactly on resume.
    full = train_baseline(config_for(cohort, tmp_path / "full", "clam_sb", epochs=3, max_instances=24),
                          progress=False)
    csv_path, features = cohort
    args = ["baseline", "--model", "clam_sb", "--cohort", str(csv_path), "--features", str(features),
            "--out", str(tmp_path / "part"), "--seed", "1", "--min-epochs", "0", "--max-instances", "24",
            "--threads", "1"]
    # exit 1: the run finishes, but the cohort's slides without usable features are skipped (and listed)
    assert main(args + ["--epochs", "2"]) == 1
    assert main(args + ["--epochs", "2"]) == 2  # an existing run is not overwritten
    assert main(["baseline", "--resume", "--out", str(tmp_path / "part"), "--epochs", "3"]) == 1
    a = load_checkpoint(tmp_path / "full" / "checkpoint_last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint_last.pt")
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert [row["train_loss"] for row in b["history"]] == [row["train_loss"] for row in full.history]


def test_early_stopping_waits_for_min_epochs(cohort, tmp_path):
    # A learning rate of ~0 keeps the validation loss flat: patience 1 stops as soon as min_epochs allows.
    result = train_baseline(config_for(cohort, tmp_path / "r", "meanpool", epochs=10, lr=1e-12, early_stopping=1,
                                       min_epochs=4), progress=False)
    assert len(result.history) == 4


def test_milrnn_runs_both_stages_in_order(cohort, tmp_path):
    result = train_baseline(config_for(cohort, tmp_path / "rnn", "milrnn", epochs=2), progress=False)
    assert [(row["stage"], row["epoch"]) for row in result.history] == [
        ("instance", 0), ("instance", 1), ("rnn", 0), ("rnn", 1)]
    assert result.best_epoch in (2, 3)  # only the last stage's model predicts
    _, net, _ = load_baseline_run(tmp_path / "rnn")
    assert net.stage == "rnn"


def test_milrnn_on_three_classes_is_a_one_line_cli_error(cohort, tmp_path, capsys):
    csv_path, features = cohort
    rows = [(f"{s}{i}", ("a", "b", "c")[i % 3], s) for s, n in (("train", 8), ("val", 4), ("test", 4))
            for i in range(n)]
    three = write_cohort(tmp_path, rows)
    capsys.readouterr()
    code = main(["baseline", "--model", "milrnn", "--cohort", str(three), "--features", str(features),
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: milrnn: MIL-RNN (Campanella et al. 2019) is defined for binary tasks only; got 3 classes\n")
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind


def test_checkpoint_of_the_main_method_is_refused(cohort, tmp_path, capsys):
    run = tmp_path / "run"
    train_baseline(config_for(cohort, run, "abmil", epochs=1), progress=False)
    # A genuine checkpoint of the local-learning trainer, written by its own code, with the same classes.
    config = TrainConfig(cohort=str(cohort[0]), out=str(tmp_path / "local"), k=1)
    trainer = Trainer(config)
    trainer.mean, trainer.std = [0.5] * 3, [0.2] * 3
    classes = ["normal", "tumor"]
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        trainer._save(build_model(config, 2), run / name, model_signature(config, classes), classes)
    expected = f"{run / 'checkpoint_best.pt'}: checkpoint is from another model (method: checkpoint 'local' vs model"
    with pytest.raises(CheckpointError) as info:
        evaluate_run(run, "test", progress=False)
    assert str(info.value).startswith(expected)
    capsys.readouterr()
    assert main(["baseline", "--resume", "--out", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'checkpoint_last.pt'}: checkpoint is from another model (method: "
                          "checkpoint 'local' vs model 'baseline'") and err.count("\n") == 1


def test_bags_are_read_lazily_and_unusable_files_are_listed(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    for i, dim in enumerate((512, 512, 256)):
        write_bag(features / f"s{i}.h5", seed=i, positive=i == 1, dim=dim)
    csv_path = write_cohort(tmp_path, [("s0", "a", "train"), ("s1", "b", "train"), ("s2", "a", "train"),
                                       ("s3", "b", "train")])
    bags = load_bags(load_cohort(csv_path, check_files=False), "train", features)
    assert (len(bags), bags.in_dim, bags.labels, bags.slide_ids) == (2, 512, [0, 1], ["s0", "s1"])
    assert bags.skipped == {
        "s2": f"{features / 's2.h5'}: features are 256-dimensional, expected 512 like the other slides",
        "s3": f"no features file {features / 's3.h5'} (run `wsilocal features` for this slide)",
    }
    write_bag(features / "s0.h5", seed=99, positive=True)  # replaced after loading: a lazy reader sees the new file
    bag = bags.get(0)
    expected, coords, _ = read_features(features / "s0.h5")
    assert torch.equal(bag.features, torch.from_numpy(expected)) and np.array_equal(bag.coords, coords)
    assert (bag.label, bag.slide_id) == (0, "s0")
