"""``wsilocal inspect``: what a slide file holds and what wsilocal would read from it.

Reports the reader, pyramid, resolution, the tissue found and the size of the tissue box at the
training resolution (2.0 µm/px, about 5x); optionally writes a thumbnail with the tissue outlined.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from wsilocal.errors import WsilocalError
from wsilocal.slide.reader import open_slide
from wsilocal.slide.tissue import TissueRegion, read_overview, tissue_region_from_overview

#: The resolution training reads slides at (about 5x).
TRAINING_MPP = 2.0
_BOX_COLOUR = (0, 160, 0)
_OUTLINE_COLOUR = (0, 60, 255)


@dataclass(frozen=True)
class SlideReport:
    """What :func:`inspect_slide` found.

    Attributes:
        levels: (width, height, downsample, µm/px or None) per pyramid level.
        mpp: µm/px at level 0, None when unknown (neither in the file nor assumed).
        tissue_bbox: (x, y, width, height) in level-0 pixels, None when no tissue was found.
        size_at_training_mpp: (width, height) of the tissue box read at 2.0 µm/px; None when the
            MPP is unknown or there is no tissue.
    """

    path: Path
    backend: str
    vendor: str | None
    levels: list[tuple[int, int, float, float | None]]
    mpp: float | None
    objective_power: float | None
    tissue_fraction: float
    tissue_bbox: tuple[int, int, int, int] | None
    size_at_training_mpp: tuple[int, int] | None


def inspect_slide(path: str | Path, *, thumbnail: Path | None = None,
                  assume_mpp: float | None = None) -> SlideReport:
    """Open a slide, detect its tissue and report; write a PNG thumbnail to ``thumbnail`` if given.

    A slide without MPP is still inspected (its MPP is reported as unknown). A slide without
    tissue is reported with no tissue box rather than raising.

    Raises:
        SlideError: the file cannot be opened or read.
        WsilocalError: the thumbnail cannot be written.
    """
    with open_slide(path, assume_mpp=assume_mpp) as slide:
        mpp = slide.mpp_or_none
        levels = [(w, h, d, mpp * d if mpp is not None else None)
                  for (w, h), d in zip(slide.level_dimensions, slide.level_downsamples, strict=True)]
        overview, downsample = read_overview(slide)
        tissue = tissue_region_from_overview(overview, downsample, slide.level_dimensions[0])
        size = None
        if tissue is not None and mpp is not None:
            _, _, w, h = tissue.bbox
            size = (round(w * mpp / TRAINING_MPP), round(h * mpp / TRAINING_MPP))
        report = SlideReport(
            path=slide.path, backend=slide.backend, vendor=slide.vendor, levels=levels, mpp=mpp,
            objective_power=slide.objective_power,
            tissue_fraction=tissue.tissue_fraction if tissue else 0.0,
            tissue_bbox=tissue.bbox if tissue else None, size_at_training_mpp=size,
        )
    if thumbnail is not None:
        _write_thumbnail(Path(thumbnail), overview, tissue)
    return report


def format_report(report: SlideReport) -> str:
    """The report as readable lines of text."""
    vendor = f" (format {report.vendor})" if report.vendor else ""
    mpp = f"{report.mpp:.4g} µm/px" if report.mpp else "unknown (pass --assume-mpp to set it)"
    power = f"{report.objective_power:g}x" if report.objective_power else "unknown"
    lines = [("slide", str(report.path)), ("reader", report.backend + vendor),
             ("resolution", f"{mpp}, objective {power}")]
    for index, (w, h, d, level_mpp) in enumerate(report.levels):
        at = f", {level_mpp:.4g} µm/px" if level_mpp else ""
        lines.append(("levels" if index == 0 else "", f"{index}: {w} x {h} px, downsample {d:.4g}{at}"))
    if report.tissue_bbox is None:
        lines.append(("tissue", "none found"))
    else:
        x, y, w, h = report.tissue_bbox
        lines.append(("tissue", f"{100 * report.tissue_fraction:.1f} % of the slide; "
                                f"box at ({x}, {y}), {w} x {h} px (level 0)"))
    if report.size_at_training_mpp is not None:
        w, h = report.size_at_training_mpp
        lines.append((f"at {TRAINING_MPP:g} µm/px", f"tissue box is {w} x {h} px"))
    return "\n".join(f"{label:<14}{text}" for label, text in lines)


def _write_thumbnail(path: Path, overview: np.ndarray, tissue: TissueRegion | None) -> None:
    """Save the overview with the tissue mask outlined and the tissue box drawn."""
    image = overview.copy()
    if tissue is not None:
        edge = tissue.mask & ~ndimage.binary_erosion(tissue.mask)
        image[edge] = _OUTLINE_COLOUR
    picture = Image.fromarray(image)
    if tissue is not None:
        x, y, w, h = (v / tissue.downsample for v in tissue.bbox)
        line = max(1, round(max(picture.size) / 400))  # visible, but thin on small thumbnails
        ImageDraw.Draw(picture).rectangle((x, y, x + w - 1, y + h - 1), outline=_BOX_COLOUR, width=line)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, format="PNG")
    except OSError as error:
        raise WsilocalError(f"{path}: cannot write the thumbnail ({error.strerror or error})") from error
