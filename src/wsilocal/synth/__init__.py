"""Synthetic H&E-like whole-slide images whose class is the *arrangement* of tumour nuclei (task
``morphology``) or the *relation* between two structures further apart than a tile (task ``context``).

A slide is described once, from its seed, by a :class:`SlideSpec`: coarse fields (tissue, lesion and stroma
density on an 8 µm grid), a list of shapes (glands, nests, fronds, vessels, fat cells, …) and a list of nuclei
(each a pre-rendered sprite). :func:`render_region` turns any level-0 rectangle of the spec into pixels, and
:func:`write_slide` streams whole slides to pyramidal SVS files. See ``docs/synthetic.md`` for the model, its
scales and what makes it hard.

The modules, lowest first (each imports only those above it):

- ``params``: constants (µm per pixel, classes, tasks, sizes), materials, kinds of nuclei, :class:`SynthParams`;
- ``shapes``: numeric helpers (noise, lattices, field sampling), shapes (blobs, capsules), the list of nuclei;
- ``variants``: nuclear sprites and texture tiles, made once per process and cached;
- ``spec``: the slide description, the builder structures are drawn into, stain and finishing;
- ``morphology``: the five arrangements, the structures common to every class, tissue and lesion fields;
- ``context``: the context task (a tumour focus and a follicle, near or far);
- ``render``: pixels (:func:`render_region`);
- ``masks``: masks, boxes and measurements written beside the slides;
- ``cohort``: :func:`make_slide`, :func:`write_slide`, :func:`synthesize_cohort`;
- ``__main__``: ``python -m wsilocal.synth OUT_DIR``.
"""

from wsilocal.synth.cohort import make_slide, synthesize_cohort, write_slide
from wsilocal.synth.masks import (
    MASK_FOLLICLE,
    MASK_GLASS,
    MASK_LESION,
    MASK_TISSUE,
    context_layout,
    follicle_mask,
    gap_um,
    label_mask,
    lesion_boxes,
    lesion_mask,
    slide_measurements,
    tissue_mask,
)
from wsilocal.synth.params import (
    APP_MAG,
    CLASS_NAMES,
    CONTEXT_CLASSES,
    DEFAULT_SIZE,
    FIELD_STEP,
    GENERATOR_VERSION,
    MPP,
    TASKS,
    UM,
    SynthParams,
    class_names,
)
from wsilocal.synth.render import render_region
from wsilocal.synth.spec import SlideSpec

__all__ = [
    "APP_MAG", "CLASS_NAMES", "CONTEXT_CLASSES", "DEFAULT_SIZE", "FIELD_STEP", "GENERATOR_VERSION", "MASK_FOLLICLE",
    "MASK_GLASS", "MASK_LESION", "MASK_TISSUE", "MPP", "TASKS", "UM", "SlideSpec", "SynthParams", "class_names",
    "context_layout", "follicle_mask", "gap_um", "label_mask", "lesion_boxes", "lesion_mask", "make_slide",
    "render_region", "slide_measurements", "synthesize_cohort", "tissue_mask", "write_slide",
]
