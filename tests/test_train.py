"""The trainer end to end on real synthetic slide files: learning, resume, run directory, errors."""

import csv
import json

import numpy as np
import pytest
import torch

from wsilocal.cli import main
from wsilocal.config import TrainConfig
from wsilocal.errors import ConfigError, SlideError
from wsilocal.infer.predict import Predictor
from wsilocal.prepare.cache import load_entry
from wsilocal.slide.cohort import load_cohort
from wsilocal.stream.sources import to_tensor
from wsilocal.synth import synthesize_cohort
from wsilocal.train.checkpoint import load_checkpoint
from wsilocal.train.data import balanced_class_weights
from wsilocal.train.evaluate import evaluate_run, load_run
from wsilocal.train.local_step import forward_all_classifiers
from wsilocal.train.trainer import Trainer, train


@pytest.fixture(scope="module")
def tiny_cohort(module_tmp):
    """Two classes, four slides each, ~1536² px at level 0 (≈190² px at 2 µm/px)."""
    out = module_tmp("cohort")
    return synthesize_cohort(out, classes=2, slides_per_class=4, size=(1536, 1536), seed=3, progress=False,
                             size_jitter=0.1)


def config_for(cohort_csv, out, **overrides):
    values = dict(cohort=str(cohort_csv), out=str(out), cache=str(cohort_csv.parent / "cache"), k=4,
                  epochs=2, accumulation=2, lr_trunk=1e-4, lr_aux=1e-3, rfr_patches=3, seed=1, threads=2,
                  calibration_slides=2)
    values.update(overrides)
    return TrainConfig(**values)


def test_tiny_cohort_is_learned_to_full_training_accuracy(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    config = config_for(tiny_cohort, run, epochs=8, augment=False, accumulation=1, plateau_patience=100)
    result = train(config, progress=False)
    metrics = evaluate_run(run, "train", checkpoint="last", progress=False)
    assert metrics["accuracy"] == 1.0, result.history[-1]
    # The run directory holds everything a user looks at.
    for name in ("config.yaml", "model.json", "checkpoint_last.pt", "checkpoint_best.pt", "metrics.csv",
                 "metrics.json", "curves.png", "train.log", "summary.json", "metrics_train.json",
                 "predictions_train.csv", "roc_train.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert any("randomly initialised" in w for w in summary["warnings"])
    history = json.loads((run / "metrics.json").read_text())
    assert len(history) == 8 and {"val_aux1_accuracy", "val_aux3_accuracy"} <= set(history[0])
    assert history[-1]["train_loss"] < history[0]["train_loss"]


@pytest.mark.parametrize("lr_schedule", ["plateau", "cosine"])
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tiny_cohort, tmp_path, lr_schedule):
    best_by = "loss" if lr_schedule == "cosine" else "balanced_accuracy"  # both choices of checkpoint_best
    full = train(config_for(tiny_cohort, tmp_path / "full", epochs=2, lr_schedule=lr_schedule, best_by=best_by),
                 progress=False)
    train(config_for(tiny_cohort, tmp_path / "part", epochs=1, lr_schedule=lr_schedule, best_by=best_by),
          progress=False)
    assert main(["train", "--resume", str(tmp_path / "part"), "--epochs", "2"]) == 0
    losses = [row["val_loss"] for row in full.history]
    if lr_schedule == "cosine":  # rates for the next epoch: half a cosine from (1e-4, 1e-3) to zero in 2 epochs
        assert [row["lr"] for row in full.history] == [pytest.approx([5e-5, 5e-4]), pytest.approx([0.0, 0.0])]
        assert full.best_epoch == losses.index(min(losses))
    a = load_checkpoint(tmp_path / "full" / "checkpoint_last.pt")
    b = load_checkpoint(tmp_path / "part" / "checkpoint_last.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert len(b["history"]) == len(full.history) == 2


def test_greedy_schedule_runs_phase_by_phase(tiny_cohort, tmp_path):
    result = train(config_for(tiny_cohort, tmp_path / "greedy", schedule="greedy", epochs=1, k=2), progress=False)
    assert [row["modules"] for row in result.history] == [[0, 1], [1, 2]]
    assert result.best_epoch == 1  # only the last phase has the final classifier


def test_existing_run_needs_resume_and_too_large_slides_are_refused(tiny_cohort, tmp_path):
    config = config_for(tiny_cohort, tmp_path / "r", epochs=1)
    train(config, progress=False)
    with pytest.raises(ConfigError, match="already holds a run; use --resume"):
        train(config, progress=False)
    with pytest.raises(SlideError, match="more than max_train_pixels .* use --streaming"):
        train(config_for(tiny_cohort, tmp_path / "big", max_train_pixels=1000), progress=False)


def test_checkpoint_from_another_model_is_refused(tiny_cohort, tmp_path, capsys):
    train(config_for(tiny_cohort, tmp_path / "k4", epochs=1), progress=False)
    (tmp_path / "k4" / "config.yaml").write_text(
        (tmp_path / "k4" / "config.yaml").read_text().replace("k: 4", "k: 8"))
    assert main(["evaluate", str(tmp_path / "k4"), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint is from another model (k: checkpoint 4 vs model 8)" in err and err.count("\n") == 1


def test_evaluate_on_another_cohort_gives_the_runs_own_probabilities_for_the_same_slides(tiny_cohort, tmp_path,
                                                                                          capsys):
    run = tmp_path / "run"
    train(config_for(tiny_cohort, run, k=2, epochs=1, augment=False), progress=False)
    evaluate_run(run, "val", checkpoint="last", progress=False)
    own = (run / "predictions_val.csv").read_text()
    # The validation slides, listed by absolute path in an external cohort of test slides only.
    val = load_cohort(tiny_cohort).split("val")
    external = tmp_path / "external.csv"
    external.write_text("slide_id,path,label,split\n" + "".join(f"{s.slide_id},{s.path},{s.label},test\n"
                                                               for s in val))
    assert main(["evaluate", str(run), "--cohort", str(external), "--checkpoint", "last",
                 "--out", str(tmp_path / "eval")]) == 0
    assert "split test: 2 slides" in capsys.readouterr().out
    assert (tmp_path / "eval" / "predictions_test.csv").read_text() == own
    assert sorted(p.name for p in (tmp_path / "eval" / "cache").iterdir())  # read into OUT/cache, at the run's MPP
    assert json.loads((tmp_path / "eval" / "metrics_test.json").read_text())["cohort"] == str(external)
    assert not (run / "predictions_test.csv").exists()  # the run's own files stay its cohort's
    assert main(["evaluate", str(run), "--cohort", str(external), "--out", str(tmp_path / "e2"),
                 "--features", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {run}: --features is for baseline runs; this run reads the slides "
                                       "themselves\n")


def test_train_cli_bad_values_are_one_line_errors(tiny_cohort, tmp_path, capsys):
    assert main(["train", "--cohort", str(tiny_cohort), "--out", str(tmp_path / "x"), "--k", "3"]) == 2
    assert capsys.readouterr().err.strip() == "error: config: k must be 1, 2, 4 or 8 (or give boundaries), got 3"
    bad = tmp_path / "bad.yaml"
    bad.write_text("cohort: c.csv\nout: r\nepochs: many\n")
    assert main(["train", str(bad)]) == 2
    assert "epochs must be int, got str 'many'" in capsys.readouterr().err


def _assert_same_step(a_dir, b_dir, history_a, history_b):
    """Two one-step runs took the same step: equal losses before it, nearly all weights moved alike.

    AdamW's first update is lr·g/(|g|+eps), about lr·sign(g): float-rounding differences between two exact
    gradient computations only flip it where g is ~0, so a few elements may differ by up to 2·lr (0.1–0.2 % of
    the weights of layer3/layer4 on the cohorts seen, spread evenly over their convolutions); a wrong gradient
    flips a large share of the layers it reaches.
    """
    assert history_a[0]["train_loss"] == pytest.approx(history_b[0]["train_loss"], rel=1e-5)
    # Those flips, each moving a weight by 2·lr, move the validation loss too: by 0.06 % (all positions attended to)
    # and 0.15 % (glass masked) on the K=1 runs below, with exact gradients.
    assert history_a[0]["val_loss"] == pytest.approx(history_b[0]["val_loss"], rel=5e-3)
    a = load_checkpoint(a_dir / "checkpoint_last.pt")["model"]
    b = load_checkpoint(b_dir / "checkpoint_last.pt")["model"]
    far = sum(int(((a[name] - b[name]).abs() > 1e-6).sum()) for name in a if a[name].is_floating_point())
    total = sum(t.numel() for t in a.values())
    assert far <= 5e-3 * total, (far, total)


def test_slides_over_the_memory_budget_train_streamed_with_the_same_result(tiny_cohort, tmp_path):
    # A budget far below any slide makes every slide stream (tile by tile, x_i in a memory-mapped file); the
    # run must take the step the plain run takes: the streamed step computes the same gradients.
    one_step = dict(k=2, epochs=1, accumulation=8, augment=False)
    plain = train(config_for(tiny_cohort, tmp_path / "plain", **one_step), progress=False)
    streamed = train(config_for(tiny_cohort, tmp_path / "streamed", memory_budget_gb=1e-4, stream_tile=96,
                                **one_step), progress=False)
    assert plain.history[0]["streamed_slides"] == plain.history[0]["val_streamed_slides"] == 0
    splits = [row["split"] for row in csv.DictReader(tiny_cohort.open())]
    # Validation streams too (the same probabilities: the validation losses agree below).
    assert (streamed.history[0]["streamed_slides"], streamed.history[0]["val_streamed_slides"]) == \
        (splits.count("train"), splits.count("val"))
    _assert_same_step(tmp_path / "plain", tmp_path / "streamed", plain.history, streamed.history)


def test_method_streaming_is_end_to_end_training_with_exact_gradients(tiny_cohort, tmp_path):
    one_step = dict(k=1, epochs=1, accumulation=8, augment=False)
    plain = train(config_for(tiny_cohort, tmp_path / "k1", **one_step), progress=False)
    streaming = train(config_for(tiny_cohort, tmp_path / "streaming", method="streaming", stream_tile=96,
                                 **one_step), progress=False)
    assert streaming.history[0]["streamed_slides"] > 0
    _assert_same_step(tmp_path / "k1", tmp_path / "streaming", plain.history, streaming.history)
    # The run directory is an ordinary one: evaluate reads it like any other.
    assert evaluate_run(tmp_path / "streaming", "val", progress=False)["n"] > 0


def test_recalibrate_bn_keeps_batchnorm_statistics_those_of_the_current_weights(tiny_cohort, tmp_path):
    """After an epoch with ``recalibrate_bn`` the saved BatchNorm statistics are what calibrating the trained
    weights gives; without it they are still those of the initial weights (so they differ)."""
    from wsilocal.models.resnet import calibrate_batchnorm
    from wsilocal.train.trainer import Trainer, build_model

    runs = {}
    for recalibrate in (True, False):
        config = config_for(tiny_cohort, tmp_path / str(recalibrate), k=2, epochs=1, augment=False,
                            recalibrate_bn=recalibrate)
        train(config, progress=False)
        runs[recalibrate] = load_checkpoint(tmp_path / str(recalibrate) / "checkpoint_last.pt")["model"]
    _, samples, _, _ = Trainer(config, progress=False)._prepare_data(None)  # the same training slides
    net = build_model(config, 2)
    net.load_state_dict(runs[True])
    calibrate_batchnorm(net.trunk, [samples.get(i)[0] for i in range(config.calibration_slides)])
    statistics = [name for name in runs[True] if name.endswith(("running_mean", "running_var"))]
    assert statistics
    for name in statistics:
        torch.testing.assert_close(net.state_dict()[name], runs[True][name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.allclose(runs[False][name], runs[True][name]) for name in statistics)


def test_balanced_class_weights_make_every_class_weigh_the_same():
    weights = balanced_class_weights([0, 0, 0, 1], 2, torch.device("cpu"))
    assert torch.allclose(weights, torch.tensor([4 / 6, 2.0]))
    assert float((weights * torch.tensor([3.0, 1.0])).std()) == 0  # class total weights are equal
    # A class without slides gets the weight of a one-slide class instead of dividing by zero.
    assert torch.allclose(balanced_class_weights([0, 0], 3, torch.device("cpu")), torch.tensor([1 / 3, 2 / 3, 2 / 3]))


def test_calibration_sees_the_central_crop_of_large_slides():
    from wsilocal.train.trainer import _central_crop

    image = torch.arange(5 * 8, dtype=torch.float32).reshape(1, 1, 5, 8)
    assert torch.equal(_central_crop(image, 4), image[..., 0:4, 2:6])  # a short axis stays whole
    assert torch.equal(_central_crop(image, 100), image)


def test_random_streams_differ_for_every_seed_purpose_and_key():
    from wsilocal.train.data import Purpose, sample_generator, stream_seed

    # Seed s's RFR stream was seed s+1's augmentation stream (purposes were told apart by seed + 1, seed + 2).
    for seed in range(5):
        for epoch, index in ((0, 0), (1, 3), (1000, 2)):
            rfr = torch.rand(8, generator=sample_generator(seed, Purpose.RFR, epoch, index))
            augment = torch.rand(8, generator=sample_generator(seed + 1, Purpose.AUGMENT, epoch, index))
            assert not torch.equal(rfr, augment)
    # Every (seed, purpose, keys) has a stream of its own, in the low 32 bits that torch's CPU generator keeps too.
    names = [(s, p, e, i) for s in range(8) for p in Purpose for e in (0, 1, 1000) for i in range(8)]
    assert len({stream_seed(*name) % 2**32 for name in names}) == len(names)
    assert stream_seed(0, Purpose.DROPOUT, 3) != stream_seed(0, Purpose.DROPOUT, 3, 0)  # a shorter key list
    with pytest.raises(ValueError, match="0..2\\*\\*32-1"):
        stream_seed(0, Purpose.ORDER, 2**32)


def _draws(generator: torch.Generator | None = None) -> tuple[float, ...]:
    """The next draws of a generator (None: torch's global one), without using it up."""
    copy = torch.Generator()
    copy.set_state(generator.get_state() if generator is not None else torch.get_rng_state())
    return tuple(torch.rand(8, generator=copy).tolist())


def test_a_runs_rfr_and_dropout_streams_are_not_the_next_seeds_augmentation(tiny_cohort, tmp_path, monkeypatch):
    from wsilocal.train import data, trainer

    rfr, dropout, augment = [], [], []
    step, augment_image = trainer.local_training_step, data.augment_image

    def spy_step(*args, generator, **kwargs):
        rfr.append(_draws(generator))
        dropout.append(_draws())  # seeded for this slide just before the step
        return step(*args, generator=generator, **kwargs)

    def spy_augment(image, aug, generator):
        augment.append(_draws(generator))
        return augment_image(image, aug, generator)

    monkeypatch.setattr(trainer, "local_training_step", spy_step)
    monkeypatch.setattr(data, "augment_image", spy_augment)
    config = config_for(tiny_cohort, tmp_path / "run", k=2, epochs=1, seed=1)
    train(config, progress=False)
    _, samples, _, _ = trainer.Trainer(config, progress=False)._prepare_data(None)
    assert len(rfr) == len(dropout) == len(samples) == len(set(rfr)) and not set(rfr) & set(dropout)
    for seed, used in ((1, rfr), (1, dropout), (2, rfr), (2, dropout), (3, dropout)):
        augment.clear()
        samples.seed = seed  # the augmentation of the slides of epoch 0 under that seed
        for index in range(len(samples)):
            samples.get(index, 0)
        assert not set(used) & set(augment), seed


def _module_copy(net, i):
    """Module i's part of the trunk and its auxiliary model, copied."""
    return {f"{part}.{name}": tensor.clone() for part, module in (("stage", net.stages[i]), ("aux", net.aux[i]))
            for name, tensor in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def test_greedy_hands_the_next_module_its_best_epoch_and_resume_keeps_it(tiny_cohort, tmp_path, monkeypatch):
    """Greedy: module 1 goes back to its best validation epoch (the trainer's selection score, scripted here so
    that the best is not the last epoch) before module 2 learns on it. A run stopped right after that best epoch
    and resumed keeps the same epoch and ends with the uninterrupted run's weights."""
    from wsilocal.errors import TrainingInterrupted
    from wsilocal.train import loop, trainer

    scripted = {(0, 0): (0.9, 0.0), (0, 1): (0.1, 0.0)}  # (phase, epoch) → score: module 1's best is its first
    now, seen = {}, {}  # seen[(run, phase, epoch)]: module 1's weights when that epoch was validated
    train_epoch, evaluate, score = trainer.Trainer._train_epoch, trainer.evaluate_samples, loop.selection_score

    def spy_train_epoch(self, net, samples, phase, phase_no, epoch, *args, **kwargs):
        now.update(trainer=self, at=(phase_no, epoch))
        return train_epoch(self, net, samples, phase, phase_no, epoch, *args, **kwargs)

    def spy_evaluate(net, *args, **kwargs):
        seen[(now["run"], *now["at"])] = _module_copy(net, 0)
        if now["run"] == "part" and now["at"] == (0, 0):
            now["trainer"].stop_requested.set()  # as Ctrl-C during validation: stops once the epoch is saved
        return evaluate(net, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "_train_epoch", spy_train_epoch)
    monkeypatch.setattr(trainer, "evaluate_samples", spy_evaluate)
    monkeypatch.setattr(loop, "selection_score", lambda m, loss, by: scripted.get(now["at"], score(m, loss, by)))
    configs = {run: config_for(tiny_cohort, tmp_path / run, schedule="greedy", k=2, epochs=2)
               for run in ("full", "part")}
    now["run"] = "full"
    full = trainer.Trainer(configs["full"], progress=False).run()
    assert [row["modules"] for row in full.history] == [[0, 1], [0, 1], [1, 2], [1, 2]]
    assert not _same(seen["full", 0, 0], seen["full", 0, 1])  # module 1 learnt in its second epoch
    assert _same(seen["full", 1, 0], seen["full", 0, 0])  # module 2 learnt on module 1's best epoch
    assert _same(seen["full", 1, 1], seen["full", 0, 0])
    assert [row.get("kept", False) for row in full.history] == [True, False, False, False]
    now["run"] = "part"
    with pytest.raises(TrainingInterrupted):
        trainer.Trainer(configs["part"], progress=False).run()
    now["run"] = "resumed"
    resumed = trainer.Trainer(configs["part"], progress=False, resume=True).run()
    assert _same(seen["resumed", 1, 0], seen["full", 0, 0])
    assert [row.get("kept", False) for row in resumed.history] == [True, False, False, False]
    a = load_checkpoint(tmp_path / "full" / "checkpoint_last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint_last.pt")["model"]
    assert _same(a, b)


def test_runs_record_glass_masking_and_runs_without_the_record_attend_to_everything(tiny_cohort, tmp_path):
    run = tmp_path / "run"
    train(config_for(tiny_cohort, run, k=2, epochs=1, augment=False), progress=False)
    meta = json.loads((run / "model.json").read_text())
    assert meta["mask_glass"] is True and "mask_glass: true" in (run / "config.yaml").read_text()
    config, net, state = load_run(run, "last")
    val = load_cohort(config.cohort).split("val")
    entries = [load_entry(config.resolved_cache(), s.slide_id) for s in val]

    def expected(tissue: bool) -> list[np.ndarray]:
        with torch.no_grad():
            return [torch.softmax(forward_all_classifiers(net, to_tensor(e.image(), state["mean"], state["std"]),
                                                          tissue=e.tissue() if tissue else None)[-1], 1)[0].numpy()
                    for e in entries]

    def evaluated() -> list[np.ndarray]:
        evaluate_run(run, "val", checkpoint="last", progress=False)
        rows = list(csv.DictReader((run / "predictions_val.csv").open()))
        return [np.array([float(r[f"p_{c}"]) for c in state["classes"]]) for r in rows]

    np.testing.assert_allclose(evaluated(), expected(tissue=True), rtol=0, atol=1e-6)
    # Written the old way (no record in model.json): evaluated, resumed and predicted with no mask, as before.
    del meta["mask_glass"]
    (run / "model.json").write_text(json.dumps(meta))
    np.testing.assert_allclose(evaluated(), expected(tissue=False), rtol=0, atol=1e-6)
    assert np.abs(np.array(expected(tissue=True)) - np.array(expected(tissue=False))).max() > 1e-5
    resumed = Trainer(config_for(tiny_cohort, run, k=2, epochs=2, augment=False), progress=False, resume=True)
    resumed.run()
    assert resumed.mask_glass is False and "mask_glass" not in json.loads((run / "model.json").read_text())
    assert Predictor.from_run(run).mask_glass is False
    # --no-mask-glass: a new run without the mask says so.
    train(config_for(tiny_cohort, tmp_path / "plain", k=2, epochs=1, mask_glass=False), progress=False)
    assert json.loads((tmp_path / "plain" / "model.json").read_text())["mask_glass"] is False
