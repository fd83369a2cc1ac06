"""Bad cohort CSVs, YAML configs and checkpoints, fed to every command that reads them.

Each gives exactly one line ``error: FILE: cause`` on stderr and exit code 2 — before any slide is read or any
output written — and a checkpoint that would run code when unpickled is refused without running it.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TILE
from rel_inputs import assert_one_line_error, run_view, run_wsilocal, write_malicious_checkpoint

from wsilocal.cli import main
from wsilocal.train.checkpoint import load_checkpoint

# --- cohort CSVs ---------------------------------------------------------------------------------------------

#: case → (change to a valid CSV, cause for commands that derive the classes, cause for those given a run's).
CSV_CASES = {
    "missing_column": ("drop split", "missing column(s) split; found slide_id, path, label", None),
    "duplicate_id": ("g0,{g1},b,train", "line 8 (g0): duplicate slide_id (first on line 2)", None),
    "unknown_split": ("x,{g1},b,training", "line 8 (x): unknown split 'training' (expected train, val or test)", None),
    "unknown_label": ("x,{g1},c,val", "class(es) without training slides: c",
                      "line 8 (x): unknown label 'c' (known: a, b)"),
    "non_utf8": ("bytes", "not UTF-8 text (byte", None),
    "dotdot": ("o,../outside.svs,a,train", "line 8 (o): path '../outside.svs' leads outside the cohort folder "
               "(use --allow-outside-paths to permit)", None),
    "symlink": ("l,link.svs,a,train", "line 8 (l): path 'link.svs' leads outside the cohort folder", None),
}


def write_bad_csv(case: str, cohort, folder: Path) -> Path:
    """A CSV in ``folder`` (absolute paths to the good slides) with the problem of ``case``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [f"{i},{cohort.folder / p},{label},{split}" for i, p, label, split in cohort.good_rows]
    change = CSV_CASES[case][0].format(g1=cohort.folder / "g1.svs")
    header = "slide_id,path,label,split"
    csv = folder / "cohort.csv"
    if case == "missing_column":
        csv.write_text("\n".join(["slide_id,path,label"] + [r.rsplit(",", 1)[0] for r in rows]) + "\n")
    elif case == "non_utf8":
        csv.write_bytes("\n".join([header, *rows]).encode() + b"\nbad\xff\xfe,x.svs,a,train\n")
    else:
        shutil.copy(cohort.folder / "g0.svs", folder.parent / "outside.svs")
        (folder / "link.svs").unlink(missing_ok=True)
        (folder / "link.svs").symlink_to(folder.parent / "outside.svs")
        csv.write_text("\n".join([header, *rows, change]) + "\n")
    return csv


def csv_command(command: str, csv: Path, tmp_path: Path, trained, features, baseline) -> list[str]:
    """The command line of ``command`` reading ``csv`` (evaluate: a copy of a run whose config names it)."""
    out = str(tmp_path / "out")
    if command.startswith("evaluate"):
        run = baseline.run if command == "evaluate-baseline" else trained.run
        return ["evaluate", str(run_view(run, tmp_path / "view", config={"cohort": str(csv)})), "--split", "val"]
    return {
        "prepare": ["prepare", str(csv), "--cache", str(tmp_path / "cache")],
        "features": ["features", "--cohort", str(csv), "--out", out, "--tile", TILE],
        "train": ["train", "--cohort", str(csv), "--out", out, "--cache", str(tmp_path / "cache")],
        "baseline": ["baseline", "--model", "abmil", "--cohort", str(csv), "--features", str(features.dir),
                     "--out", out],
        "predict": ["predict", "--run", str(trained.run), "--cohort", str(csv), "--out", out],
    }[command]


@pytest.mark.parametrize("case", CSV_CASES)
@pytest.mark.parametrize("command", ["prepare", "features", "train", "baseline", "predict", "evaluate",
                                     "evaluate-baseline"])
def test_bad_cohort_csv_is_one_line_error_before_any_work(command, case, cohort, trained, features, baseline,
                                                          tmp_path, capsys):
    csv = write_bad_csv(case, cohort, tmp_path / "c")
    argv = csv_command(command, csv, tmp_path, trained, features, baseline)
    capsys.readouterr()
    assert main(argv) == 2
    _, derived, given = CSV_CASES[case]
    cause = given if given and command in ("predict", "evaluate", "evaluate-baseline") else derived
    assert_one_line_error(capsys.readouterr().err, csv, cause)
    out = tmp_path / "out"
    assert not (tmp_path / "cache").exists() and not (out.exists() and any(out.glob("*.h5")))
    assert not (out / "checkpoint_last.pt").exists() and not (out / "predictions.csv").exists()


@pytest.mark.parametrize("case", ["dotdot", "symlink"])
def test_paths_leading_outside_are_read_with_the_explicit_flag(case, cohort, tmp_path, capsys):
    csv = write_bad_csv(case, cohort, tmp_path / "c")
    assert main(["prepare", str(csv), "--cache", str(tmp_path / "cache"), "--allow-outside-paths"]) == 0
    slide_id = {"dotdot": "o", "symlink": "l"}[case]
    assert (tmp_path / "cache" / f"{slide_id}.npy").is_file()


# --- YAML configs --------------------------------------------------------------------------------------------

YAML_CASES = {
    "wrong_type": ("epochs: many\n", "config: epochs must be int, got str 'many'"),
    "wrong_list": ("boundaries: 3\n", "config: boundaries must be a list, got int 3"),
    "unknown_key": ("epoch: 3\nlearning_rate: 0.1\n", "config: unknown key(s) epoch, learning_rate"),
    "not_a_mapping": ("- epochs\n- 3\n", "expected a mapping of keys to values"),
    "invalid_yaml": ("epochs: [1, 2\n", "invalid YAML at line 2"),
    "out_of_range": ("accumulation: 0\n", "config: accumulation must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", YAML_CASES)
@pytest.mark.parametrize("command", ["train", "baseline"])
def test_bad_yaml_config_is_one_line_error(command, case, cohort, features, tmp_path, capsys):
    text, cause = YAML_CASES[case]
    if command == "baseline" and case in ("wrong_list", "out_of_range"):  # fields of the main trainer only
        text, cause = "lr: fast\n", "config: lr must be float, got str 'fast'"
    path = tmp_path / "config.yaml"
    whole = case in ("not_a_mapping", "invalid_yaml")  # the problem is the file as a whole
    path.write_text(text if whole else f"cohort: {cohort.good_csv}\nout: {tmp_path / 'run'}\n{text}")
    extra = ["--model", "abmil", "--features", str(features.dir)] if command == "baseline" else []
    assert main([command, str(path), *extra]) == 2
    assert_one_line_error(capsys.readouterr().err, path, cause)
    assert not (tmp_path / "run").exists()


def test_a_damaged_config_in_a_run_directory_names_that_file(trained, tmp_path, capsys):
    view = run_view(trained.run, tmp_path / "view", config={"epoch": 3})
    assert main(["evaluate", str(view), "--split", "val"]) == 2
    assert_one_line_error(capsys.readouterr().err, view / "config.yaml", "config: unknown key(s) epoch")


# --- checkpoints ---------------------------------------------------------------------------------------------


def bad_checkpoint(case: str, good: Path, other: Path, marker: Path) -> bytes:
    """The bytes of a bad checkpoint: another model's, the good one cut in half, or a malicious pickle."""
    if case == "other_model":
        return other.read_bytes()
    if case == "truncated":
        data = good.read_bytes()
        return data[: len(data) // 2]
    if case == "mismatched_tensors":  # the right signature, a tensor of the wrong shape (edited by hand)
        state = load_checkpoint(good)
        name = next(k for k in state["model"] if k.endswith("weight") and state["model"][k].dim() > 1)
        state["model"][name] = state["model"][name][:1]
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()
    path = marker.with_name("malicious.pt")
    write_malicious_checkpoint(path, marker)
    return path.read_bytes()


CHECKPOINT_CAUSES = {
    "other_model": "checkpoint is from another model (method: checkpoint ",
    "truncated": "truncated or corrupt checkpoint",
    "mismatched_tensors": "fit the model",  # "tensors do not fit" (load_model_state), "does not fit" (predict)
    "malicious": "refused to load, it contains objects beyond tensors and plain data",
}
WEIGHTS_CAUSES = {"other_model": "not a ResNet34 state dict", "truncated": "cannot load weights",
                  "mismatched_tensors": "not a ResNet34 state dict",
                  "malicious": "cannot load weights: Weights only load failed"}


@pytest.mark.parametrize("case", CHECKPOINT_CAUSES)
@pytest.mark.parametrize("command", ["evaluate", "predict", "train --resume", "evaluate-baseline",
                                     "baseline --resume"])
def test_bad_checkpoint_is_refused_in_one_line(command, case, cohort, trained, baseline, tmp_path, capsys):
    marker = tmp_path / "pwned"
    main_run = not command.endswith("baseline") and command != "baseline --resume"
    run, other = (trained.run, baseline.run) if main_run else (baseline.run, trained.run)
    name = "checkpoint_last.pt" if "--resume" in command else "checkpoint_best.pt"
    data = bad_checkpoint(case, run / name, other / name, marker)
    view = run_view(run, tmp_path / "view", replace={name: data})
    argv = {
        "predict": ["predict", "--run", str(view), str(cohort.folder / "g4.svs"), "--out", str(tmp_path / "p")],
        "train --resume": ["train", "--resume", str(view)],
        "baseline --resume": ["baseline", "--resume", "--out", str(view)],
    }.get(command, ["evaluate", str(view), "--split", "val"])
    capsys.readouterr()
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, view / name, CHECKPOINT_CAUSES[case])
    assert not marker.exists(), "the pickled code ran"
    assert (view / name).read_bytes() == data  # nothing overwrote the file it refused


@pytest.mark.parametrize("case", CHECKPOINT_CAUSES)
@pytest.mark.parametrize("command", ["features", "train"])
def test_bad_weights_file_is_refused_in_one_line(command, case, cohort, trained, tmp_path, capsys):
    marker = tmp_path / "pwned"
    weights = tmp_path / "weights.pth"
    weights.write_bytes(bad_checkpoint(case, trained.run / "checkpoint_best.pt", trained.run / "checkpoint_best.pt",
                                       marker))
    out = tmp_path / "out"
    argv = (["features", "--cohort", str(cohort.good_csv), "--out", str(out), "--weights", str(weights)]
            if command == "features" else
            ["train", "--cohort", str(cohort.good_csv), "--out", str(out), "--cache", str(cohort.cache),
             "--weights", str(weights), "--epochs", "1", "--k", "2"])
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, weights, WEIGHTS_CAUSES[case])
    assert not marker.exists(), "the pickled code ran"
    assert not any(out.glob("*.h5")) and not (out / "checkpoint_last.pt").exists()


def test_the_malicious_checkpoint_really_runs_code_when_unpickled(tmp_path):
    """The control for the tests above: loading it the unsafe way does create the file."""
    marker = tmp_path / "pwned"
    path = write_malicious_checkpoint(tmp_path / "malicious.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.exists()
    os.remove(marker)


@pytest.mark.parametrize("case", ["prepare: bad csv", "train: bad yaml", "evaluate: malicious checkpoint"])
def test_errors_in_a_real_process_are_one_line_with_exit_code_2(case, cohort, trained, tmp_path):
    """The console as a user has it: the real exit code, stderr one line, no traceback, the code not run."""
    marker = tmp_path / "pwned"
    if case == "prepare: bad csv":
        path = write_bad_csv("unknown_split", cohort, tmp_path / "c")
        args, cause = ["prepare", str(path), "--cache", str(tmp_path / "cache")], CSV_CASES["unknown_split"][1]
    elif case == "train: bad yaml":
        path = tmp_path / "config.yaml"
        path.write_text(f"cohort: {cohort.good_csv}\nout: {tmp_path / 'run'}\nepoch: 3\n")
        args, cause = ["train", str(path)], "config: unknown key(s) epoch"
    else:
        data = bad_checkpoint("malicious", trained.run / "checkpoint_best.pt", trained.run / "checkpoint_best.pt",
                              marker)
        view = run_view(trained.run, tmp_path / "view", replace={"checkpoint_best.pt": data})
        path, args = view / "checkpoint_best.pt", ["evaluate", str(view), "--split", "val"]
        cause = CHECKPOINT_CAUSES["malicious"]
    result = run_wsilocal(args)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, path, cause)
    assert not marker.exists()
