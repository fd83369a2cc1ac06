"""Processes killed with SIGKILL mid-run, then run again: nothing finished is redone, nothing partial is kept, and
the results equal those of an uninterrupted run.

Kills land at the most delicate point (a file fully written under its temporary name, not yet renamed: the
process kills itself there) or at a random time (``train``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from conftest import GOOD, TILE, TRAIN_OPTIONS
from rel_inputs import run_wsilocal

from wsilocal.cli import main
from wsilocal.features.h5 import read_features
from wsilocal.train.checkpoint import load_checkpoint

GOOD_IDS = [slide_id for slide_id, _, _ in GOOD]

#: Run the CLI in a child that SIGKILLs itself when it is about to rename a finished file onto TARGET.
KILL_AT_RENAME = """
import os, signal, sys
target, args = sys.argv[1], sys.argv[2:]
rename = os.replace
def replace(src, dst, *a, **k):
    if os.path.basename(str(dst)) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *a, **k)
os.replace = replace
from wsilocal.cli import main
sys.exit(main(args))
"""


def killed_at_rename(target: str, args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, target, *args], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    return result


def identity(path: Path) -> tuple[int, int]:
    """(inode, modification time): a file rewritten, even with the same bytes, changes it."""
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_prepare_killed_mid_run_resumes_without_redoing_finished_slides(cohort, trained, tmp_path, capsys):
    cache = tmp_path / "cache"
    killed_at_rename("g2.npy", ["prepare", str(cohort.good_csv), "--cache", str(cache)])
    done = {i: identity(cache / f"{i}.npy") for i in ("g0", "g1")}
    assert len(temporaries(cache)) == 1 and not (cache / "g2.npy").exists() and not (cache / "g2.json").exists()

    assert main(["prepare", str(cohort.good_csv), "--cache", str(cache)]) == 0
    assert f"built {len(GOOD) - 2}, reused 2, skipped 0" in capsys.readouterr().out
    assert {i: identity(cache / f"{i}.npy") for i in done} == done
    assert temporaries(cache) == []
    for slide_id in GOOD_IDS:  # the same pixels as the uninterrupted cache of the trained run
        assert np.array_equal(np.load(cache / f"{slide_id}.npy"), np.load(cohort.cache / f"{slide_id}.npy"))


def test_features_killed_mid_run_resume_without_redoing_finished_slides(cohort, features, tmp_path, capsys):
    out_dir = tmp_path / "features"
    args = ["features", "--cohort", str(cohort.good_csv), "--out", str(out_dir), "--tile", TILE]
    killed_at_rename("g2.h5", args)
    done = {i: identity(out_dir / f"{i}.h5") for i in ("g0", "g1")}
    assert len(temporaries(out_dir)) == 1 and not (out_dir / "g2.h5").exists()

    assert main(args) == 0
    assert f"computed {len(GOOD) - 2}, reused 2, skipped 0" in capsys.readouterr().out
    assert {i: identity(out_dir / f"{i}.h5") for i in done} == done
    assert temporaries(out_dir) == []
    for slide_id in GOOD_IDS:  # the same features as the uninterrupted run
        a, b = read_features(out_dir / f"{slide_id}.h5"), read_features(features.dir / f"{slide_id}.h5")
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def start_train(cohort, run: Path, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """The command of the ``trained`` fixture, in a child process (same cohort, cache, options and seed)."""
    args = ["train", "--cohort", str(cohort.mixed_csv), "--out", str(run), "--cache", str(cohort.cache),
            *TRAIN_OPTIONS]
    return subprocess.Popen([sys.executable, "-m", "wsilocal", *args], stdout=subprocess.DEVNULL, stderr=stderr,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "WSILOCAL_TRACEBACK": ""})


def assert_same_weights(run: Path, reference: Path) -> None:
    resumed = load_checkpoint(run / "checkpoint_last.pt")
    expected = load_checkpoint(reference / "checkpoint_last.pt")
    assert len(resumed["history"]) == len(expected["history"]) == 2
    assert resumed["model"].keys() == expected["model"].keys()
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


def test_train_killed_at_random_points_then_resumed_equals_an_uninterrupted_run(cohort, trained, tmp_path):
    """Killed once at a random time after its first checkpoint, once while writing the next one; the resumed
    run's final weights equal the uninterrupted run's (``trained``, the same command and seed)."""
    run = tmp_path / "run"
    delay = random.Random(8).uniform(0.0, 1.0)
    process = start_train(cohort, run)
    try:
        while not (run / "checkpoint_last.pt").exists():
            assert process.poll() is None, "train ended before its first checkpoint"
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        assert process.wait(timeout=60) == -signal.SIGKILL, "train finished before the random kill"
    first = load_checkpoint(run / "checkpoint_last.pt")  # whatever the moment, the checkpoint is whole
    assert first["next_epoch"] == 1

    killed_at_rename("checkpoint_last.pt", ["train", "--resume", str(run)])
    assert load_checkpoint(run / "checkpoint_last.pt")["next_epoch"] == 1  # the new one never replaced it
    assert len(temporaries(run)) == 1  # ... it was written in full under its temporary name

    result = run_wsilocal(["train", "--resume", str(run)])
    assert result.returncode == trained.code, result.stderr[-2000:]
    assert temporaries(run) == []
    assert_same_weights(run, trained.run)


def test_ctrl_c_saves_a_mid_epoch_checkpoint_exits_130_and_resume_matches(cohort, trained, tmp_path):
    """SIGINT during the first epoch (no checkpoint yet): the step in progress finishes, a checkpoint is saved
    mid-epoch, the last line says how to resume, exit code 130; resuming ends with the uninterrupted weights."""
    run = tmp_path / "run"
    process = start_train(cohort, run, stderr=subprocess.PIPE)
    log = run / "train.log"
    while not (log.exists() and "train " in log.read_text() and "slides, validation" in log.read_text()):
        assert process.poll() is None, "train ended before training started"
        time.sleep(0.02)
    time.sleep(0.3)  # into the first epoch (one slide per optimizer step)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=180)

    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: saved " + str(run / "checkpoint_last.pt")), last
    assert f"wsilocal train --resume {run}" in last, last
    saved = load_checkpoint(run / "checkpoint_last.pt")  # whole and loadable
    assert saved["next_epoch"] == 0 and saved["history"] == []
    assert saved["mid_epoch"]["next_group"] >= 1 and len(saved["mid_epoch"]["records"]) == saved["mid_epoch"][
        "next_group"]

    result = run_wsilocal(["train", "--resume", str(run)])
    assert result.returncode == trained.code, result.stderr[-2000:]
    assert_same_weights(run, trained.run)
    # The resumed epoch reports every slide's loss, the ones before Ctrl-C included.
    reference = load_checkpoint(trained.run / "checkpoint_last.pt")["history"]
    resumed = load_checkpoint(run / "checkpoint_last.pt")["history"]
    assert resumed[0]["train_loss"] == reference[0]["train_loss"]


def test_a_damaged_cache_entry_is_rebuilt_not_read(cohort, tmp_path, capsys):
    """An entry's pixels cut short (a copy gone wrong, a disk error) are noticed and the slide is read again."""
    cache = tmp_path / "cache"
    assert main(["prepare", str(cohort.good_csv), "--cache", str(cache)]) == 0
    data = (cache / "g3.npy").read_bytes()
    (cache / "g3.npy").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["prepare", str(cohort.good_csv), "--cache", str(cache)]) == 0
    assert f"built 1, reused {len(GOOD) - 1}, skipped 0" in capsys.readouterr().out
    assert (cache / "g3.npy").read_bytes() == data
