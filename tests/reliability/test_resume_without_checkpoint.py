"""A run killed before its first checkpoint can still be resumed (it starts over with the same seed).

Ctrl-C saving a mid-epoch checkpoint is pending (see docs/reliability.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch
from conftest import TRAIN_OPTIONS
from rel_inputs import run_wsilocal

from wsilocal.train.checkpoint import load_checkpoint


def start_train(cohort, run) -> subprocess.Popen:
    args = ["train", "--cohort", str(cohort.mixed_csv), "--out", str(run), "--cache", str(cohort.cache),
            *TRAIN_OPTIONS]
    return subprocess.Popen([sys.executable, "-m", "wsilocal", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_training_to_start(process: subprocess.Popen, run) -> None:
    """Until the log says the epoch loop begins (logged after the model is built, before epoch 0)."""
    log = run / "train.log"
    while not (log.exists() and "validation 2 slides" in log.read_text()):
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.02)


def assert_same_weights(run, reference) -> None:
    a = load_checkpoint(run / "checkpoint_last.pt")["model"]
    b = load_checkpoint(reference / "checkpoint_last.pt")["model"]
    assert a.keys() == b.keys()
    for name, tensor in b.items():
        assert torch.equal(a[name], tensor), name


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed(cohort, trained, tmp_path):
    """``--resume`` of a run directory with a config but no checkpoint yet starts the run over (same seed)."""
    run = tmp_path / "run"
    process = start_train(cohort, run)
    wait_for_training_to_start(process, run)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert (run / "config.yaml").is_file() and not (run / "checkpoint_last.pt").exists()

    result = run_wsilocal(["train", "--resume", str(run)])
    assert result.returncode == trained.code, result.stderr[-2000:]
    assert_same_weights(run, trained.run)
