"""The command line loads only what the chosen command needs: ``--help`` of every command but ``baseline`` loads no
torch (checked in a fresh interpreter, from ``-X importtime``), and every command's help still lists its options."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import wsilocal
from wsilocal.cli import build_parser

BENCHMARKS = ("accuracy", "memory", "speed", "pretrain", "scaling", "soak", "all")
# A few options of each command (its help must list them).
OPTIONS = {
    "synth": ["--out", "--task", "--classes", "--slides-per-class", "--size", "--seed", "--workers"],
    "prepare": ["cohort", "--cache", "--mpp", "--assume-mpp", "--max-pixels", "--allow-outside-paths", "--strict"],
    "features": ["--cohort", "--out", "--tile", "--min-tissue", "--arch", "--weights", "--device", "--strict"],
    "inspect": ["slide", "--thumbnail", "--assume-mpp"],
    "train": ["config", "--resume", "--devices", "--cohort", "--k", "--lr-trunk", "--no-rfr", "--stream-tile"],
    "pretrain": ["config", "--resume", "--devices", "--slides", "--objective", "--steps", "--crop"],
    "evaluate": ["run", "--split", "--checkpoint", "--heatmap", "--strict"],
    "predict": ["SLIDE", "--run", "--cohort", "--split", "--out", "--heatmap", "--memory-budget-gb", "--bf16"],
    "baseline": ["config", "--resume", "--features", "--model", "--max-instances", "--best-by"],
    "bench": list(BENCHMARKS),
    "demo": ["--out", "--quick"],
    "bench accuracy": ["--out", "--quick", "--seeds", "--arch", "--init", "--pretrain-steps", "--tasks", "--rows"],
    "bench memory": ["--out", "--sizes", "--k", "--variants", "--streaming-sizes", "--tile", "--window-mib",
                     "--stream-store"],
    "bench speed": ["--out", "--sizes", "--repeats", "--run", "--workers", "--batch-size", "--scan-mpp", "--no-bf16"],
    "bench pretrain": ["--out", "--accuracy-out", "--quick", "--steps", "--objective", "--batch-size", "--crop"],
    "bench scaling": ["--out", "--size", "--k", "--repeats", "--warmup", "--processes"],
    "bench soak": ["--out", "--epochs", "--warmup", "--max-slope-mib", "--slides-per-class", "--threads"],
    "bench all": ["--out", "--quick", "--sections", "--weights", "--report-only"],
}
# `baseline --model` offers the MIL models' names, which their package (torch) owns.
NEEDS_TORCH = {"baseline"}


def imported_modules(*argv: str) -> tuple[set[str], str]:
    """The modules ``python -m wsilocal ARGV`` imports in a fresh interpreter, and what it printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(wsilocal.__file__).parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "wsilocal", *argv], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # -X importtime writes "import time: <self us> | <cumulative us> | <indented module name>" per import
    modules = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return modules, done.stdout


@pytest.mark.parametrize("command", ["", *(c for c in OPTIONS if c not in NEEDS_TORCH)])
def test_help_loads_no_torch(command):
    modules, printed = imported_modules(*command.split(), "--help")
    assert printed.startswith(f"usage: wsilocal {command}".rstrip())
    assert "wsilocal.cli" in modules  # the check sees the package's own imports
    assert not {m for m in modules if m == "torch" or m.startswith("torch.")}


def test_parsing_a_command_line_loads_no_benchmark():
    modules, _ = imported_modules("inspect", "--help")
    assert not {m for m in modules if m.startswith("wsilocal.bench")}
    assert "numpy" not in modules  # nor the libraries that inspecting a slide needs


@pytest.mark.parametrize("command", list(OPTIONS))
def test_every_command_help_lists_its_options(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command.split(), "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: wsilocal {command}")
    missing = [option for option in OPTIONS[command] if option not in printed]
    assert not missing


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    printed = capsys.readouterr().out
    assert all(command in printed for command in OPTIONS if " " not in command)
