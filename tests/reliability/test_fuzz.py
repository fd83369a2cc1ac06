"""Fuzzing the two parsers of user files: cohort CSVs and YAML configs.

Contract: whatever the bytes or the structure, the result is either a valid object or a
:class:`~wsilocal.errors.WsilocalError` (one line, naming the file) — never another exception.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from wsilocal.config import BaselineConfig, TrainConfig, load_config
from wsilocal.errors import CohortError, ConfigError, WsilocalError
from wsilocal.slide.cohort import SPLITS, load_cohort

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def folder(module_tmp) -> Path:
    """A cohort folder with two real (empty) slide files the CSVs may name, and one outside it."""
    root = module_tmp("fuzz")
    (root / "c").mkdir()
    for name in ("a.svs", "b.svs"):
        (root / "c" / name).write_bytes(b"x")
    (root / "outside.svs").write_bytes(b"x")
    (root / "c" / "link.svs").symlink_to(root / "outside.svs")
    return root / "c"


def check_cohort(path: Path, check_files: bool) -> None:
    try:
        cohort = load_cohort(path, check_files=check_files)
    except CohortError as exc:
        assert str(exc).startswith(f"{path}: ") and exc.problems and "\n" not in str(exc)
        return
    ids = [s.slide_id for s in cohort.slides]
    assert len(ids) == len(set(ids)) and all(ids)
    assert all(s.split in SPLITS and s.label in cohort.classes for s in cohort.slides)
    assert len(cohort.classes) >= 2
    assert all("/" not in i and not i.startswith(".") for i in ids)  # ids name cache files


@FUZZ
@given(data=st.binary(max_size=600))
@example(data=b"slide_id,path,label,split\na,a\x00.svs,x,train\nb,b.svs,y,train\n")
@example(data=b"slide_id,path,label,split\n../../evil,a.svs,x,train\nb,b.svs,y,train\n")
@example(data=b"\xef\xbb\xbfslide_id,path,label,split\r\na,a.svs,x,train\r\nb,b.svs,y,val\r\n")
def test_any_bytes_as_a_cohort_csv(folder, data):
    path = folder / "bytes.csv"
    path.write_bytes(data)
    for check_files in (True, False):
        check_cohort(path, check_files)


CELLS = st.one_of(
    st.sampled_from(["a", "b", "a.svs", "b.svs", "link.svs", "../outside.svs", "/etc/passwd", "", " ", "..",
                     "train", "val", "test", "TRAIN", "x" * 300, "a/b", ".hidden", "é", "\x00", "\n", '"', ","]),
    st.text(max_size=12),
)
HEADERS = st.lists(st.sampled_from(["slide_id", "path", "label", "split", "case_id", "extra", ""]),
                   min_size=0, max_size=7)


@FUZZ
@given(header=HEADERS, rows=st.lists(st.lists(CELLS, max_size=7), max_size=8))
def test_structured_cohort_csvs(folder, header, rows):
    """Rows of plausible and hostile cells under shuffled headers, written with quoting as a spreadsheet would."""
    import csv

    path = folder / "rows.csv"
    with open(path, "w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    for check_files in (True, False):
        check_cohort(path, check_files)


def check_config(path: Path, cls: type) -> None:
    try:
        config = load_config(path, cls=cls)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc)
        return
    except WsilocalError:  # e.g. an explicit split naming units that do not exist
        return
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # every value has its declared type
        value, hint = getattr(config, f.name), hints[f.name]
        allowed = typing.get_args(hint) or (hint,)
        assert any(isinstance(value, typing.get_origin(a) or a) for a in allowed), (f.name, value)


@FUZZ
@given(data=st.binary(max_size=400))
@example(data=b"epochs: 1" + b"0" * 400)  # an integer beyond every float
@example(data=b"mpp: 1" + b"0" * 400)
@example(data=b"[" * 300)  # nesting
@example(data=b"boundaries: [9, 3]")
@example(data=b"a: &a [*a]")  # an alias to itself
def test_any_bytes_as_a_yaml_config(folder, data):
    path = folder / "config.yaml"
    path.write_bytes(data)
    check_config(path, TrainConfig)
    check_config(path, BaselineConfig)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
                    st.floats(), st.text(max_size=8), st.sampled_from(["local", "abmil", "greedy", "auto", "cpu"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4),
                                                                                          inner, max_size=3),
                      max_leaves=8)
KEYS = st.sampled_from(sorted({f.name for cls in (TrainConfig, BaselineConfig) for f in dataclasses.fields(cls)}))


@FUZZ
@given(values=st.dictionaries(KEYS | st.text(max_size=6), VALUES, max_size=8))
def test_structured_yaml_configs(folder, values):
    """Real field names with values of every type (and some unknown keys)."""
    path = folder / "structured.yaml"
    path.write_text(yaml.safe_dump(values))
    check_config(path, TrainConfig)
    check_config(path, BaselineConfig)
