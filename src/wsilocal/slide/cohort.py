"""Cohort CSVs: which slides, their labels, splits and cases.

Format: ``slide_id,path,label,split`` plus an optional ``case_id``. Relative paths resolve against the
CSV's folder and must stay inside it (``..`` or a symlink leading out is refused unless
``allow_outside=True``); absolute paths are taken as given. Splits are ``train``, ``val`` and ``test``.
Slide ids name the cache and feature files, so they may not contain path separators or control
characters, start with a dot, or exceed 200 bytes.
Every problem in the file is collected and reported at once in one :class:`CohortError`.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from wsilocal.errors import CohortError

SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ("slide_id", "path", "label", "split")
MAX_ID_BYTES = 200  # slide ids name files; most file systems allow 255 bytes per name


@dataclass(frozen=True)
class CohortSlide:
    """One row of a cohort CSV."""

    slide_id: str
    path: Path
    label: str
    split: str
    case_id: str


@dataclass(frozen=True)
class Cohort:
    """A validated cohort: its slides and the class names (index = position)."""

    csv_path: Path
    slides: tuple[CohortSlide, ...]
    classes: tuple[str, ...]

    def split(self, name: str) -> list[CohortSlide]:
        """The slides of one split (``train``, ``val`` or ``test``), in file order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return [s for s in self.slides if s.split == name]

    @property
    def class_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def label_index(self, slide: CohortSlide) -> int:
        return self.class_index[slide.label]


def _resolve_slide_path(raw: str, folder: Path, allow_outside: bool) -> tuple[Path, str | None]:
    """Resolve a CSV path entry; return (path, problem or None)."""
    given = Path(raw)
    if given.is_absolute():
        return given, None
    path = folder / given
    if not allow_outside:
        real = Path(os.path.realpath(path))
        root = Path(os.path.realpath(folder))
        if real != root and root not in real.parents:
            return path, f"path {raw!r} leads outside the cohort folder (use --allow-outside-paths to permit)"
    return path, None


def _slide_id_problem(slide_id: str) -> str | None:
    """Why a slide id cannot name files (``<cache>/<slide_id>.npy``, ``<features>/<slide_id>.h5``), or None."""
    if any(c in slide_id for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in slide_id):
        return "contains a path separator or a control character"
    if slide_id.startswith("."):
        return "starts with a dot (hidden and temporary files do)"
    if len(slide_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        return f"is longer than {MAX_ID_BYTES} bytes"
    return None


def _short(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[: limit - 3] + "...")


def load_cohort(
    csv_path: str | Path,
    *,
    classes: list[str] | tuple[str, ...] | None = None,
    check_files: bool = True,
    allow_outside: bool = False,
) -> Cohort:
    """Read and validate a cohort CSV.

    Args:
        csv_path: the CSV file.
        classes: a class list saved by an earlier run; labels outside it are errors and the order is kept.
            Without it, classes are the sorted distinct labels.
        check_files: also check that every slide file exists and is a readable, non-empty file.
        allow_outside: allow relative paths that lead outside the CSV's folder.

    Raises:
        CohortError: listing every problem found (missing columns, duplicate ids, unknown splits or labels,
            missing files, a class without training slides, a case in two splits, bad encoding).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CohortError(csv_path, ["file not found" if not csv_path.exists() else "not a file"])
    try:
        text = csv_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CohortError(csv_path, [f"not UTF-8 text (byte {exc.start}: {exc.reason})"]) from None
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as exc:
        raise CohortError(csv_path, [f"malformed CSV: {exc}"]) from None
    header = [h.strip() for h in (csv.DictReader(io.StringIO(text)).fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise CohortError(csv_path, [f"missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'}"])
    if not rows:
        raise CohortError(csv_path, ["no slides listed"])

    problems: list[str] = []
    folder = csv_path.parent
    seen_ids: dict[str, int] = {}
    slides: list[CohortSlide] = []
    for line_no, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in row.items()}
        slide_id, raw_path, label, split = (row.get(c, "") for c in REQUIRED_COLUMNS)
        where = f"line {line_no}"
        if not slide_id:
            problems.append(f"{where}: empty slide_id")
            continue
        id_problem = _slide_id_problem(slide_id)
        if id_problem:
            problems.append(f"{where}: slide_id {_short(slide_id)} {id_problem}")
            continue
        where = f"line {line_no} ({slide_id})"
        if slide_id in seen_ids:
            problems.append(f"{where}: duplicate slide_id (first on line {seen_ids[slide_id]})")
            continue
        seen_ids[slide_id] = line_no
        if split not in SPLITS:
            problems.append(f"{where}: unknown split {split!r} (expected train, val or test)")
        if not label:
            problems.append(f"{where}: empty label")
        elif classes is not None and label not in classes:
            problems.append(f"{where}: unknown label {label!r} (known: {', '.join(classes)})")
        if not raw_path:
            problems.append(f"{where}: empty path")
            continue
        if "\0" in raw_path:  # the OS cannot take it; Path() would raise ValueError
            problems.append(f"{where}: path contains a NUL character")
            continue
        try:
            path, path_problem = _resolve_slide_path(raw_path, folder, allow_outside)
            if path_problem:
                problems.append(f"{where}: {path_problem}")
            elif check_files:
                if not path.exists():
                    problems.append(f"{where}: slide file not found: {path}")
                elif not (path.is_file() or path.is_dir()):  # .mrxs/DICOM may be folders beside a file
                    problems.append(f"{where}: not a file: {path}")
                elif path.is_file() and not os.access(path, os.R_OK):
                    problems.append(f"{where}: slide file not readable: {path}")
        except OSError as exc:  # a name too long, a symlink loop, ...
            problems.append(f"{where}: cannot use path {_short(raw_path)} ({exc.strerror or exc})")
            continue
        case_id = row.get("case_id") or slide_id
        slides.append(CohortSlide(slide_id, path, label, split, case_id))

    case_splits: dict[str, set[str]] = defaultdict(set)
    for s in slides:
        case_splits[s.case_id].add(s.split)
    for case_id, splits in sorted(case_splits.items()):
        if len(splits & set(SPLITS)) > 1:
            problems.append(f"case {case_id!r} appears in more than one split ({', '.join(sorted(splits))})")

    class_list = tuple(classes) if classes is not None else tuple(sorted({s.label for s in slides if s.label}))
    train_labels = {s.label for s in slides if s.split == "train"}
    if any(s.split == "train" for s in slides):
        empty = [c for c in class_list if c not in train_labels]
        if empty and classes is None:
            problems.append(f"class(es) without training slides: {', '.join(empty)}")
    if len(class_list) < 2 and not problems:
        problems.append(f"at least two classes are needed, found {len(class_list)}: {', '.join(class_list)}")

    if problems:
        raise CohortError(csv_path, problems)
    return Cohort(csv_path=csv_path, slides=tuple(slides), classes=class_list)
