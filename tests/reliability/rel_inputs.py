"""Bad inputs for the reliability tests: broken slide files, decompression bombs, a malicious checkpoint.

Plain functions (no pytest), shared by the fixtures in ``conftest.py`` and the tests. Every file is real: it is
read by the same readers (OpenSlide, tiffslide, torch) a user's file would be.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

from wsilocal.slide.tiff_writer import write_pyramidal_tiff

GLASS = (242, 240, 243)
STAIN = {"a": ((226, 150, 196), 0.10), "b": ((180, 120, 200), 0.30)}  # colour and share of nuclei per class
NUCLEUS = (112, 62, 150)
_PROGRESS_BAR = re.compile(r"^[^|]*\d+%\|")  # "prepare:  40%|####      | 4/10 [00:01<00:01, ...]"
SIDE = 768  # good slides: 768² px at 0.25 µm/px, a tissue box of about 65² px at 2 µm/px


def tissue_pixels(label: str, seed: int, width: int = SIDE, height: int = SIDE) -> np.ndarray:
    """An H&E-like slide image: glass with one stained tissue block (class ``label`` sets its look)."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = GLASS
    colour, nuclei = STAIN[label]
    x0, y0 = width // 8 + seed % 16, height // 6
    block = image[y0 : y0 + height * 2 // 3, x0 : x0 + width * 2 // 3]
    block[:] = colour
    block[rng.random(block.shape[:2]) < nuclei] = NUCLEUS
    return image


def write_good_slide(path: Path, label: str, seed: int) -> Path:
    write_pyramidal_tiff(path, tissue_pixels(label, seed))
    return path


#: Every bad slide input of the issue: name → (file name, the cause its error message must give).
BAD_SLIDES = {
    "missing": ("missing.svs", "file not found"),
    "empty": ("empty.svs", "empty file (0 bytes)"),
    "truncated10": ("truncated10.svs", "truncated or corrupt"),
    "truncated50": ("truncated50.svs", "truncated or corrupt"),
    "truncated90": ("truncated90.svs", "truncated or corrupt"),
    "text": ("text.svs", "not a slide format OpenSlide or tiffslide can read"),
    "bomb": ("bomb.tif", "decompression-bomb guard"),  # a flat TIFF of one 412 MiB strip
    "no_mpp": ("nompp.tiff", "no resolution metadata (MPP)"),
    "blank": ("blank.svs", "no tissue found"),
    "1x1": ("one_pixel.svs", "no tissue found"),
    "100000x10": ("strip.svs", "no tissue found"),
}
#: The bad slides no reader opens (the rest open, and fail on their content).
UNOPENABLE = ("missing", "empty", "truncated10", "truncated50", "truncated90", "text", "bomb")


def write_bad_slides(folder: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Write the files of :data:`BAD_SLIDES` into ``folder``; name → (path, cause).

    ``good`` is a valid slide, cut short for the truncated cases; "missing" is not written.
    """
    files = {name: folder / filename for name, (filename, _) in BAD_SLIDES.items()}
    files["empty"].write_bytes(b"")
    data = good.read_bytes()
    for percent in (10, 50, 90):
        files[f"truncated{percent}"].write_bytes(data[: len(data) * percent // 100])
    files["text"].write_text("slide_id,path\nthis is not a slide\n")
    write_single_strip_tiff(files["bomb"], 12_000, 12_000)
    write_pyramidal_tiff(files["no_mpp"], tissue_pixels("a", 7), mpp=None, layout="generic")
    write_pyramidal_tiff(files["blank"], np.full((SIDE, SIDE, 3), GLASS, np.uint8))
    write_pyramidal_tiff(files["1x1"], np.full((1, 1, 3), STAIN["a"][0], np.uint8))
    write_pyramidal_tiff(files["100000x10"], tissue_pixels("a", 3, 100_000, 10))
    return {name: (files[name], cause) for name, (_, cause) in BAD_SLIDES.items()}


def _tiff(entries: list[tuple[int, int, list[int]]], data: bytes) -> bytes:
    """A little-endian classic TIFF: one IFD of (tag, type 3 = SHORT or 4 = LONG, values), then ``data``.

    A value of ``-1`` stands for the offset of ``data`` in the file. Values that do not fit in the IFD
    entry's 4 bytes are stored after the IFD.
    """
    def pack(kind: int, values: list[int], data_offset: int = 0) -> bytes:
        return b"".join(struct.pack("<H" if kind == 3 else "<I", data_offset if v == -1 else v) for v in values)

    extra_offset = 8 + 2 + 12 * len(entries) + 4  # header, entry count, entries, next-IFD offset
    data_offset = extra_offset + sum(len(pack(k, v)) for _, k, v in entries if len(pack(k, v)) > 4)
    ifd, extra = bytearray(struct.pack("<H", len(entries))), bytearray()
    for tag, kind, values in entries:
        packed = pack(kind, values, data_offset)
        if len(packed) <= 4:
            ifd += struct.pack("<HHI", tag, kind, len(values)) + packed.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHII", tag, kind, len(values), extra_offset + len(extra))
            extra += packed
    ifd += struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + bytes(ifd) + bytes(extra) + data


def _zeros_deflated(n_bytes: int) -> bytes:
    """zlib stream of ``n_bytes`` zero bytes (black pixels), compressed without holding them all."""
    compressor = zlib.compressobj(1)
    block = bytes(min(n_bytes, 1 << 24))
    parts, left = [], n_bytes
    while left:
        n = min(left, len(block))
        parts.append(compressor.compress(block[:n]))
        left -= n
    return b"".join(parts) + compressor.flush()


def write_single_strip_tiff(path: Path, width: int, height: int) -> Path:
    """A flat RGB TIFF stored as ONE deflate strip: a small file whose first pixel costs width·height·3 bytes."""
    data = _zeros_deflated(width * height * 3)
    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [8, 8, 8]), (259, 3, [8]), (262, 3, [2]),
               (273, 4, [-1]), (277, 3, [3]), (278, 4, [height]), (279, 4, [len(data)]), (284, 3, [1])]
    path.write_bytes(_tiff(entries, data))
    return path


def write_tiled_claim_tiff(path: Path, width: int, height: int, tile: int = 1024) -> Path:
    """A flat tiled RGB TIFF of any claimed size whose tiles all share one stored (black) tile.

    The file is small; reading it whole means decoding width·height pixels.
    """
    data = _zeros_deflated(tile * tile * 3)
    n_tiles = -(-width // tile) * -(-height // tile)
    entries = [(256, 4, [width]), (257, 4, [height]), (258, 3, [8, 8, 8]), (259, 3, [8]), (262, 3, [2]),
               (277, 3, [3]), (284, 3, [1]), (322, 3, [tile]), (323, 3, [tile]),
               (324, 4, [-1] * n_tiles), (325, 4, [len(data)] * n_tiles)]
    path.write_bytes(_tiff(entries, data))
    return path


class FileCreator:
    """Unpickling this object calls ``open(path, "w")``: a file appears if a loader runs pickled code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_malicious_checkpoint(path: Path, marker: Path, model: dict | None = None) -> Path:
    """A checkpoint shaped like ours (``model``, ``format_version``) whose unpickling would create ``marker``."""
    torch.save({"model": model or {}, "format_version": 1, "payload": FileCreator(marker)}, path)
    return path


def run_view(run: Path, folder: Path, *, config: dict | None = None, replace: dict | None = None) -> Path:
    """A copy of a run directory for one test: config.yaml rewritten (``out`` → the copy, plus ``config``
    changes), ``replace`` files (name → bytes) written, every other file linked to the original."""
    folder.mkdir(parents=True)
    for item in run.iterdir():
        if item.is_file() and item.name != "config.yaml" and item.name not in (replace or {}):
            (folder / item.name).symlink_to(item)
    values = yaml.safe_load((run / "config.yaml").read_text())
    values.update(out=str(folder), **(config or {}))
    (folder / "config.yaml").write_text(yaml.safe_dump(values))
    for name, data in (replace or {}).items():
        (folder / name).write_bytes(data)
    return folder


def shown_lines(stderr: str) -> list[str]:
    """The lines a terminal shows of ``stderr``, progress bars (tqdm) left out."""
    shown = [line.rsplit("\r", 1)[-1].strip() for line in stderr.split("\n")]  # \r redraws a line
    return [line for line in shown if line and not _PROGRESS_BAR.match(line)]


def assert_one_line_error(err: str, path: Path | str, cause: str) -> None:
    """stderr shows exactly one line, ``error: ...`` naming ``path`` and containing ``cause``; no traceback."""
    lines = shown_lines(err)
    assert len(lines) == 1 and err.endswith("\n"), f"not one line: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert str(path) in lines[0], f"{path} not named in {lines[0]!r}"
    assert cause in lines[0], f"{cause!r} not in {lines[0]!r}"
    assert "Traceback" not in err


def run_wsilocal(args: list[str], *, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m wsilocal ARGS`` in a fresh process (the real exit code, stdout and stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WSILOCAL_TRACEBACK": ""}
    return subprocess.run([sys.executable, "-m", "wsilocal", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def run_measured(args: list[str], folder: Path, timeout: float = 120) -> tuple[int, str, int]:
    """``python -m wsilocal ARGS`` in a fresh process: (exit code, stderr, that process's peak RSS in bytes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WSILOCAL_TRACEBACK": ""}
    err_path = folder / "stderr.txt"
    with open(err_path, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "wsilocal", *args], stdout=subprocess.DEVNULL,
                                   stderr=err, env=env)
        try:
            _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (not all children's maximum)
        finally:
            process.returncode = 0  # reaped above: keep Popen from waiting again
    return os.waitstatus_to_exitcode(status), err_path.read_text(), usage.ru_maxrss * 1024


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


@contextlib.contextmanager
def read_only_folder(folder: Path, monkeypatch) -> Iterator[str]:
    """Make ``folder`` read-only for this process; yields how: "chmod", "immutable" or "monkeypatch".

    chmod does not stop root, so as root the folder gets the file system's immutable flag (``chattr +i``,
    set with the same ioctl), which does. Where the file system has no such flag, every way wsilocal
    creates files (``open``, ``os.open``, ``h5py.File``) is patched to fail with EACCES inside ``folder``.
    Restored on exit.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield "chmod"
        finally:
            folder.chmod(0o755)
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, b"\0" * 4))[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | FS_IMMUTABLE_FL))
    except OSError:  # no immutable flag on this file system
        os.close(fd)
        yield _refuse_writes_in(folder, monkeypatch)
        return
    try:
        yield "immutable"
    finally:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
        os.close(fd)


def _refuse_writes_in(folder: Path, monkeypatch) -> str:
    import builtins

    import h5py

    def inside(path) -> bool:
        return isinstance(path, (str, Path)) and Path(os.path.abspath(path)).parent == folder.resolve()

    def guard(original, is_write):
        def guarded(path, *args, **kwargs):
            if inside(path) and is_write(args, kwargs):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return original(path, *args, **kwargs)
        return guarded

    mode = lambda args, kwargs: any(c in (args[0] if args else kwargs.get("mode", "r")) for c in "wax+")  # noqa: E731
    monkeypatch.setattr(builtins, "open", guard(builtins.open, mode))
    monkeypatch.setattr(h5py, "File", guard(h5py.File, mode))
    monkeypatch.setattr(os, "open", guard(os.open, lambda args, kwargs: bool(args[0] & (os.O_WRONLY | os.O_RDWR))))
    return "monkeypatch"
