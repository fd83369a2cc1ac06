"""The generator's constants and knobs: scale (µm per pixel), classes and tasks, the colour model's materials,
the kinds of nuclei, and :class:`SynthParams`, every parameter of a slide."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wsilocal.errors import ConfigError

GENERATOR_VERSION = "1.2"  # 1.1: the context task; 1.2: cases matched between classes (sizes, splits, stain)
MPP = 0.25  # µm per level-0 pixel (40x); every size below is given in µm and converted with UM
APP_MAG = 40
UM = 1.0 / MPP  # level-0 pixels per µm
CLASS_NAMES = ("glandular", "solid", "papillary", "cribriform", "micropapillary")
CONTEXT_CLASSES = ("near", "far")  # classes of the context task: the follicle's distance from the tumour focus
TASKS = ("morphology", "context")
DEFAULT_SIZE = {"morphology": (8192, 8192), "context": (28800, 12800)}  # level-0 px: 2×2 mm, 7.2×3.2 mm
FIELD_STEP = 32  # level-0 px between nodes of the coarse fields (8 µm); also the lesion-mask downsample
# Textures and nuclear sprites come in a few variants, each made once per process (~0.5 s) and cached;
# a slide picks one at random and shifts its texture coordinates.
VARIANTS = 4
EDGE = 1.5  # anti-aliased edge width in px

# Macenko's reference optical-density vectors (per R, G, B) of haematoxylin and eosin.
STAIN_OD = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
GLASS_OD = np.array([0.018, 0.022, 0.030])  # the faint tint of empty glass

# Materials fill shapes: haematoxylin and eosin concentration, which texture modulates them, how much.
FIBRE, GRAIN = 0, 1
MATERIALS = {
    "stroma": (0.05, 0.42, FIBRE, 0.5),
    "epithelium": (0.12, 0.36, GRAIN, 0.25),
    "lumen": (0.00, 0.08, GRAIN, 0.60),
    "fluid": (0.02, 0.28, GRAIN, 0.50),
    "fat": (0.00, 0.00, GRAIN, 0.00),
    "blood": (0.04, 1.45, GRAIN, 0.35),
    "wall": (0.07, 0.85, FIBRE, 0.30),
    "lymphoid": (0.28, 0.22, GRAIN, 0.30),
    "germinal": (0.10, 0.30, GRAIN, 0.30),  # pale germinal centre of a follicle (context task)
}
MATERIAL_IDS = {name: i for i, name in enumerate(MATERIALS)}


@dataclass(frozen=True)
class NucleusKind:
    """How one kind of nucleus looks: sizes in µm, haematoxylin concentration, chromatin detail."""

    major: tuple[float, float]  # long axis range
    minor: tuple[float, float]  # short axis range
    irregular: float  # amplitude of boundary wobble
    density: tuple[float, float]  # haematoxylin concentration range
    chromatin: float  # strength of the coarse chromatin texture
    rim: float  # extra stain at the nuclear membrane (vesicular nuclei)
    nucleolus: float  # probability of a visible nucleolus


NUCLEUS_KINDS = {
    "tumour": NucleusKind((8.0, 10.5), (6.0, 8.0), 0.07, (0.7, 0.95), 0.45, 0.45, 0.6),
    "benign": NucleusKind((6.5, 8.0), (5.0, 6.0), 0.03, (1.05, 1.3), 0.25, 0.15, 0.1),
    "lymphocyte": NucleusKind((5.8, 7.2), (5.4, 6.8), 0.03, (1.7, 2.1), 0.15, 0.0, 0.0),
    "spindle": NucleusKind((11.0, 16.0), (2.0, 2.8), 0.05, (1.3, 1.6), 0.20, 0.0, 0.0),
    # Added last, so that the sprites of the kinds above (drawn in this order) stay as they were.
    "centroblast": NucleusKind((8.0, 10.0), (7.0, 8.5), 0.05, (0.75, 0.95), 0.30, 0.40, 0.5),
}
SPRITE_SHAPES, SPRITE_ANGLES = 8, 16  # per kind: distinct outlines × orientations over 180°
# Where each kind's sprites start in variants.nucleus_sprites (kinds in the order above).
SPRITE_OFFSET = {name: i * SPRITE_SHAPES * SPRITE_ANGLES for i, name in enumerate(NUCLEUS_KINDS)}


@dataclass
class SynthParams:
    """Every knob of the generator. Sizes of slides are level-0 pixels at :data:`MPP` µm/px.

    Attributes:
        task: ``"morphology"`` (classes differ by the arrangement of tumour nuclei) or ``"context"`` (two
            classes, ``near``/``far``: the distance between a tumour focus and a lymphoid follicle).
        classes: number of classes (2–5), named by the first ``classes`` entries of :data:`CLASS_NAMES`
            (morphology task only).
        size: (width, height) of level 0 in px; default by task (:data:`DEFAULT_SIZE`): 8192² px is 2×2 mm.
        lesion_fraction: range of the lesion's share of the tissue area, drawn uniformly per slide.
        lesion_regions: range of the number of lesion foci per slide (they may merge or split).
        tissue_pieces: range of the number of tissue pieces on the glass.
        tissue_cover: range of the tissue's share of the slide area (approximate).
        stain_variation: scale of the per-slide stain perturbation (0 = every slide stained the same).
        distractors: scale of the density of class-independent structures (lymphoid aggregates,
            vessels, fat, benign ducts); 0 removes them.
        seed: seed of the slide (a cohort derives one seed per slide from its own seed).
        quality: JPEG quality of the written tiles.
        context_tumour: context task: arrangement of the tumour focus A, one of :data:`CLASS_NAMES`.
        context_tumour_um: context task: range of A's diameter in µm.
        context_follicle_um: context task: range of the follicle B's diameter in µm.
        context_near_um: context task: range of the A–B gap (edge to edge, µm) of class ``near``.
        context_far_um: context task: range of the gap of class ``far``.
        context_tile_um: context task: edge of the tiles a tile-based model sees (256 px at 2 µm/px). No
            tile of this size, at any offset, holds both A and B, or A or B and glass
            (:attr:`context_margin_um`).

    The context task ignores ``classes``, ``lesion_fraction``, ``lesion_regions``, ``tissue_pieces`` and
    ``tissue_cover``.
    """

    task: str = "morphology"
    classes: int = 3
    size: tuple[int, int] | None = None
    lesion_fraction: tuple[float, float] = (0.05, 0.30)
    lesion_regions: tuple[int, int] = (1, 3)
    tissue_pieces: tuple[int, int] = (1, 3)
    tissue_cover: tuple[float, float] = (0.35, 0.55)
    stain_variation: float = 1.0
    distractors: float = 1.0
    seed: int = 0
    quality: int = 90
    context_tumour: str = "solid"
    context_tumour_um: tuple[float, float] = (400.0, 600.0)
    context_follicle_um: tuple[float, float] = (250.0, 400.0)
    context_near_um: tuple[float, float] = (800.0, 1200.0)
    context_far_um: tuple[float, float] = (2800.0, 3400.0)
    context_tile_um: float = 512.0

    def __post_init__(self) -> None:
        if self.size is None:  # the context layout needs a larger slide than the morphology task
            self.size = DEFAULT_SIZE.get(self.task, DEFAULT_SIZE["morphology"])
        self.size = tuple(self.size)

    @property
    def context_margin_um(self) -> float:
        """Least distance of A and B from glass, and least A–B gap: a tile's diagonal plus two mask pixels.

        Any square tile of edge ``context_tile_um`` that holds two points holds them within its diagonal, √2
        times its edge; the masks these distances are measured on are 8 µm pixels (one of slack each side).
        """
        return math.sqrt(2) * self.context_tile_um + 2 * FIELD_STEP * MPP

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an out-of-range knob."""
        problems = []
        if self.task not in TASKS:
            problems.append(f"task must be one of {', '.join(TASKS)}, not {self.task!r}")
        if self.task == "context":
            problems += self._context_problems()
        if not 2 <= self.classes <= len(CLASS_NAMES):
            problems.append(f"classes must be 2..{len(CLASS_NAMES)}, not {self.classes}")
        if min(self.size) < 256:
            problems.append(f"size must be at least 256 px a side, not {self.size}")
        lo, hi = self.lesion_fraction
        if not 0 < lo <= hi <= 0.6:
            problems.append(f"lesion_fraction must satisfy 0 < lo <= hi <= 0.6, not {self.lesion_fraction}")
        for name in ("lesion_regions", "tissue_pieces"):
            lo_n, hi_n = getattr(self, name)
            if not 1 <= lo_n <= hi_n:
                problems.append(f"{name} must satisfy 1 <= lo <= hi, not {(lo_n, hi_n)}")
        if not 0.05 <= self.tissue_cover[0] <= self.tissue_cover[1] <= 0.8:
            problems.append(f"tissue_cover must lie within 0.05..0.8, not {self.tissue_cover}")
        if self.stain_variation < 0 or self.distractors < 0:
            problems.append("stain_variation and distractors must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))

    def _context_problems(self) -> list[str]:
        problems = []
        for name in ("context_tumour_um", "context_follicle_um", "context_near_um", "context_far_um"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                problems.append(f"{name} must satisfy 0 < lo <= hi, not {(lo, hi)}")
        if self.context_tile_um <= 0:
            problems.append(f"context_tile_um must be > 0, not {self.context_tile_um}")
        elif self.context_near_um[0] < self.context_margin_um:
            problems.append(f"context_near_um must start at >= {self.context_margin_um:.0f} µm (a tile's diagonal "
                            f"plus 16 µm) so that no tile holds both structures, not {self.context_near_um[0]}")
        if self.context_far_um[0] <= self.context_near_um[1]:
            problems.append(f"context_far_um {self.context_far_um} must lie beyond context_near_um "
                            f"{self.context_near_um}")
        if self.context_tumour not in CLASS_NAMES:
            problems.append(f"context_tumour must be one of {', '.join(CLASS_NAMES)}, not {self.context_tumour!r}")
        return problems


def class_names(classes: int, task: str = "morphology") -> list[str]:
    """Label names of a cohort: the first ``classes`` of :data:`CLASS_NAMES`, or ``near``, ``far`` (context)."""
    if task == "context":
        return list(CONTEXT_CLASSES)
    if not 2 <= classes <= len(CLASS_NAMES):
        raise ConfigError(f"classes must be 2..{len(CLASS_NAMES)}, not {classes}")
    return list(CLASS_NAMES[:classes])
