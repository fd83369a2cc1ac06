import pytest

from wsilocal.errors import CohortError
from wsilocal.slide.cohort import load_cohort

HEADER = "slide_id,path,label,split,case_id\n"


def write_cohort(tmp_path, rows, header=HEADER, files=True):
    for row in rows:
        name = row.split(",")[1]
        if files and name and not name.startswith(("..", "/")):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(b"x")
    path = tmp_path / "cohort.csv"
    path.write_text(header + "\n".join(rows) + "\n")
    return path


GOOD = ["s1,a.svs,tumour,train,c1", "s2,b.svs,normal,train,c2", "s3,c.svs,tumour,val,c3",
        "s4,d.svs,normal,test,c4"]


def test_good_cohort_resolves_relative_paths_and_sorts_classes(tmp_path):
    cohort = load_cohort(write_cohort(tmp_path, GOOD))
    assert cohort.classes == ("normal", "tumour")
    assert [s.slide_id for s in cohort.split("train")] == ["s1", "s2"]
    assert cohort.slides[0].path == tmp_path / "a.svs"
    assert cohort.label_index(cohort.slides[0]) == 1


def test_all_problems_are_reported_at_once(tmp_path):
    rows = GOOD + ["s1,e.svs,normal,train,c5", "s6,f.svs,normal,training,c6", "s7,missing.svs,normal,test,c7"]
    path = write_cohort(tmp_path, rows)
    (tmp_path / "missing.svs").unlink()
    with pytest.raises(CohortError) as err:
        load_cohort(path)
    message = str(err.value)
    assert message.startswith(str(path))
    assert "duplicate slide_id" in message and "unknown split 'training'" in message
    assert "slide file not found" in message
    assert len(err.value.problems) == 3


def test_missing_columns(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("slide_id,file,label\ns1,a.svs,x\n")
    with pytest.raises(CohortError, match="missing column\\(s\\) path, split"):
        load_cohort(path)


def test_case_in_two_splits(tmp_path):
    rows = GOOD + ["s5,e.svs,tumour,test,c1"]
    with pytest.raises(CohortError, match="case 'c1' appears in more than one split \\(test, train\\)"):
        load_cohort(write_cohort(tmp_path, rows))


def test_unknown_label_against_saved_classes(tmp_path):
    with pytest.raises(CohortError, match="unknown label 'tumour'"):
        load_cohort(write_cohort(tmp_path, GOOD), classes=["normal", "benign"])


def test_class_without_training_slides(tmp_path):
    rows = ["s1,a.svs,tumour,train,c1", "s2,b.svs,normal,val,c2", "s3,c.svs,tumour,val,c3"]
    with pytest.raises(CohortError, match="class\\(es\\) without training slides: normal"):
        load_cohort(write_cohort(tmp_path, rows))


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(HEADER.encode() + b"s1,\xff\xfe.svs,x,train,c\n")
    with pytest.raises(CohortError, match="not UTF-8"):
        load_cohort(path)


def test_path_escaping_the_cohort_folder_needs_a_flag(tmp_path):
    outside = tmp_path / "outside.svs"
    outside.write_bytes(b"x")
    inner = tmp_path / "cohort"
    inner.mkdir()
    (inner / "link.svs").symlink_to(outside)
    rows = ["s1,../outside.svs,a,train,c1", "s2,link.svs,b,train,c2", "s3,../outside.svs,a,val,c3"]
    with pytest.raises(CohortError, match="leads outside the cohort folder") as err:
        load_cohort(write_cohort(inner, rows, files=False))
    assert len(err.value.problems) == 3  # both '..' rows and the symlink
    cohort = load_cohort(inner / "cohort.csv", allow_outside=True)
    assert len(cohort.slides) == 3


def test_missing_csv(tmp_path):
    with pytest.raises(CohortError, match="file not found"):
        load_cohort(tmp_path / "nope.csv")
