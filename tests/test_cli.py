"""The `wsilocal` command as a user runs it: synth → inspect, bad slides (the quick demo: tests/test_demo.py)."""


from PIL import Image

from wsilocal.cli import main


def test_synth_then_inspect(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "c"), "--classes", "2", "--slides-per-class", "4",
                 "--size", "1024x1024", "--seed", "4"]) == 0
    lines = (tmp_path / "c" / "cohort.csv").read_text().splitlines()
    assert lines[0] == "slide_id,path,label,split,case_id" and len(lines) == 9
    slide = tmp_path / "c" / lines[1].split(",")[1]
    thumb = tmp_path / "thumb.png"
    capsys.readouterr()
    assert main(["inspect", str(slide), "--thumbnail", str(thumb)]) == 0
    out = capsys.readouterr().out
    assert "aperio" in out and "0.25" in out and "tissue" in out.lower()
    assert Image.open(thumb).size[0] > 0


def test_inspect_bad_files_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "text.svs").write_text("not a slide\n")
    cases = {
        tmp_path / "missing.svs": "file not found",
        tmp_path / "empty.svs": "empty file (0 bytes)",
        tmp_path / "text.svs": "not a slide format",
    }
    for path, cause in cases.items():
        assert main(["inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: ") and cause in err and err.count("\n") == 1
