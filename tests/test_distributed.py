"""Distributed training (gloo, 2 CPU processes) computes what one process computes.

One spawned pair of processes (the library path: :func:`spawn_processes`, the trainer inside an existing
process group) does the step, evaluation and trainer runs; ``wsilocal train --devices 2`` (the torchrun path)
runs once as a subprocess. The single-process references run here, in the test process.
"""

import csv
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from wsilocal.cli import main
from wsilocal.config import TrainConfig, save_config
from wsilocal.models.local_net import LocalNet
from wsilocal.prepare.cache import prepare_cohort
from wsilocal.slide.cohort import load_cohort
from wsilocal.synth import synthesize_cohort
from wsilocal.train.checkpoint import load_checkpoint
from wsilocal.train.data import CachedSlides
from wsilocal.train.distributed import DistContext, GradientAllReduce, spawn_processes
from wsilocal.train.local_step import local_training_step
from wsilocal.train.metrics import classification_metrics
from wsilocal.train.trainer import evaluate_samples, gradient_buckets, train

RUN_FILES = {"config.yaml", "model.json", "checkpoint_last.pt", "checkpoint_best.pt", "metrics.csv", "metrics.json",
             "curves.png", "train.log", "summary.json"}
# Optimizer steps of the step test: slide indices per step. Step 2 gives rank 0 two slides and rank 1 one
# (rank 0 accumulates before it all-reduces), step 3 gives rank 1 none (it sends zeros).
STEP_GROUPS = [[0, 1], [2, 3, 4], [5]]
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cohort(module_tmp):
    """Eight ~128² px slides at 2 µm/px: 3 training slides (an odd number: the last group is short), 5 validation."""
    folder = module_tmp("cohort")
    csv_path = synthesize_cohort(folder, classes=2, slides_per_class=4, size=(1024, 1024), seed=7, progress=False,
                                 size_jitter=0.1)
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    labels = sorted({r["label"] for r in rows})
    first, second = ([r["slide_id"] for r in rows if r["label"] == label] for label in labels)
    train_ids = {first[0], first[1], second[0]}  # both classes
    for row in rows:
        row["split"] = "train" if row["slide_id"] in train_ids else "val"
        row["case_id"] = row["slide_id"]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    prepare_cohort(load_cohort(csv_path), folder / "cache", progress=False)
    return csv_path


def run_config(cohort_csv, out, **overrides) -> TrainConfig:
    values = dict(cohort=str(cohort_csv), out=str(out), cache=str(cohort_csv.parent / "cache"), k=2, epochs=2,
                  accumulation=1, lr_trunk=1e-4, lr_aux=1e-3, rfr_patches=3, seed=1, threads=1,
                  calibration_slides=2)
    values.update(overrides)
    return TrainConfig(**values)


def validation_samples(cohort_csv) -> CachedSlides:
    cohort = load_cohort(cohort_csv)
    result, stats = prepare_cohort(cohort, cohort_csv.parent / "cache", progress=False)
    val = cohort.split("val")
    return CachedSlides([result.entries[s.slide_id] for s in val], [cohort.label_index(s) for s in val],
                        stats["mean"], stats["std"])


def make_net() -> LocalNet:
    torch.manual_seed(0)
    return LocalNet(2, 2, rfr_patches=3)


def slide(i: int) -> tuple[torch.Tensor, int]:
    return torch.randn(1, 3, 96 + 16 * (i % 3), 128, generator=torch.Generator().manual_seed(i)), i % 2


def train_steps(net: LocalNet, ctx: DistContext) -> list[dict]:
    """The STEP_GROUPS optimizer steps, this rank taking every world_size-th slide of a group (as the trainer)."""
    net.train()
    # Plain SGD: new weights = old − lr × summed gradient, so equal weights mean equal gradient sums. (AdamW's
    # first step is ±lr whatever the gradient's size: on a parameter whose gradient is only float noise, like
    # the bias before a softmax, it turns rounding differences into differences of lr.)
    optimizer = torch.optim.SGD(net.param_groups(1e-4, 2e-4))  # small: a random-init trunk has large gradients
    states = []
    for group in STEP_GROUPS:
        reducer = GradientAllReduce(gradient_buckets(net, range(2)))
        mine = ctx.shard(group)
        for n, i in enumerate(mine):
            image, label = slide(i)
            torch.manual_seed(100 + i)  # this slide's dropout
            sync = reducer.launch if ctx.distributed and n == len(mine) - 1 else None
            local_training_step(net, image, label, loss_scale=1 / len(group),
                                generator=torch.Generator().manual_seed(i), on_module_backward=sync)
        if ctx.distributed:
            reducer.finish()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ctx.average_running_statistics(net)
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    return states


def two_rank_worker(ctx: DistContext, cohort_csv, out) -> None:
    """Everything the library-path tests need, in one pair of processes."""
    torch.save(train_steps(make_net(), ctx), out / f"steps_rank{ctx.rank}.pt")
    evaluation = evaluate_samples(make_net(), validation_samples(cohort_csv), ctx.device, ctx=ctx)
    (out / f"evaluation_rank{ctx.rank}.pkl").write_bytes(pickle.dumps(evaluation))
    train(run_config(cohort_csv, out / "full"), progress=False)  # the trainer inside the caller's process group
    train(run_config(cohort_csv, out / "resumed", epochs=2), resume=True, progress=False)


@pytest.fixture(scope="module")
def cli_run(cohort, module_tmp):
    """``wsilocal train CONFIG --devices 2`` for one epoch: (its run directory, the finished process)."""
    run = module_tmp("cli") / "run"
    config = run.parent / "run.yaml"
    save_config(run_config(cohort, run, epochs=1), config)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "wsilocal", "train", str(config), "--devices", "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done


@pytest.fixture(scope="module")
def two_ranks(cohort, cli_run, module_tmp):
    out = module_tmp("two_ranks")
    shutil.copytree(cli_run[0], out / "resumed")  # the 2-process epoch 0, resumed below on 2 processes
    spawn_processes(two_rank_worker, 2, (cohort, out), threads=1)
    return out


def comparable(state: dict) -> dict:
    """A state dict without the RFR decoders' running BatchNorm statistics: no output uses them, and ranks
    average theirs once per epoch instead of keeping one running average over all slides."""
    return {k: v for k, v in state.items() if not (".rfr." in k and k.rsplit(".", 1)[1] in BN_STATISTICS)}


def assert_states_close(a: dict, b: dict) -> None:
    a, b = comparable(a), comparable(b)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


def test_two_ranks_step_like_one_process_accumulating_over_their_slides(two_ranks):
    rank0, rank1 = (torch.load(two_ranks / f"steps_rank{r}.pt") for r in (0, 1))
    reference = train_steps(make_net(), DistContext())
    for step, (a, b, ref) in enumerate(zip(rank0, rank1, reference, strict=True)):
        for name in ref:  # every rank holds the very same weights and statistics
            assert torch.equal(a[name], b[name]), (step, name)
        assert_states_close(a, ref)
    before = make_net().state_dict()
    for name in ("head.classifier.0.weight", "trunk.layer1.0.conv1.weight"):  # the steps did change weights
        assert not torch.equal(rank0[-1][name], before[name]), name


def test_distributed_evaluation_equals_one_process_on_an_odd_cohort(two_ranks, cohort):
    samples = validation_samples(cohort)
    assert len(samples) == 5
    reference = evaluate_samples(make_net(), samples, torch.device("cpu"))
    for rank in (0, 1):
        gathered = pickle.loads((two_ranks / f"evaluation_rank{rank}.pkl").read_bytes())
        assert gathered["slide_ids"] == reference["slide_ids"] == [e.slide_id for e in samples.entries]
        torch.testing.assert_close(torch.tensor(gathered["probabilities"]), torch.tensor(reference["probabilities"]),
                                   rtol=0, atol=1e-6)
        assert gathered["loss"] == pytest.approx(reference["loss"], abs=1e-6)
        assert len(gathered["aux_probabilities"]) == 5
        classes = ["a", "b"]
        assert (classification_metrics(gathered["probabilities"], gathered["labels"], classes)
                == classification_metrics(reference["probabilities"], reference["labels"], classes))


def test_devices_2_runs_two_processes_and_only_rank_0_writes(cli_run):
    run, done = cli_run
    assert done.stdout.count("best epoch 0") == 1  # rank 0 reports for both
    assert {p.name for p in run.iterdir()} == RUN_FILES  # one train.log, no per-rank or temporary files
    log = (run / "train.log").read_text()
    assert log.count("distributed: 2 processes (cpu), effective batch 2 slides per optimizer step") == 1
    assert log.count("phase 0 epoch 0:") == 1


def test_devices_2_failure_is_one_line_from_rank_0(tmp_path):
    done = subprocess.run([sys.executable, "-m", "wsilocal", "train", "--cohort", str(tmp_path / "missing.csv"),
                           "--out", str(tmp_path / "run"), "--devices", "2"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path / 'missing.csv'}: file not found"


def test_resume_on_the_same_world_size_equals_the_uninterrupted_run(two_ranks):
    full = load_checkpoint(two_ranks / "full" / "checkpoint_last.pt")
    resumed = load_checkpoint(two_ranks / "resumed" / "checkpoint_last.pt")
    for name, tensor in full["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert [row["epoch"] for row in resumed["history"]] == [0, 1]
    for run in ("full", "resumed"):
        assert {p.name for p in (two_ranks / run).iterdir()} == RUN_FILES


def test_resume_on_one_process_with_the_same_effective_batch_continues_the_run(two_ranks, cli_run):
    # The checkpoint does not depend on the world size. One process with accumulation 2 forms the same groups
    # of two slides as two processes with accumulation 1, so its second epoch is the 2-process one.
    run = cli_run[0]
    assert main(["train", "--resume", str(run), "--epochs", "2", "--accumulation", "2", "--threads", "1"]) == 0
    resumed = load_checkpoint(run / "checkpoint_last.pt")
    full = load_checkpoint(two_ranks / "full" / "checkpoint_last.pt")
    assert [row["epoch"] for row in resumed["history"]] == [0, 1]
    assert resumed["history"][0]["train_loss"] == full["history"][0]["train_loss"]
    assert_states_close(resumed["model"], full["model"])
    assert resumed["history"][1]["val_loss"] == pytest.approx(full["history"][1]["val_loss"], abs=1e-5)
