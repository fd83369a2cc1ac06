"""Shared fixtures: small real slide files written with the project's pyramidal TIFF writer."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from wsilocal.models.resnet import ResNetTrunk
from wsilocal.slide.tiff_writer import write_pyramidal_tiff

BACKGROUND = (242, 240, 243)  # glass: near white, a faint tint as on real scans
EOSIN = (226, 150, 196)  # pink stroma
HAEMATOXYLIN = (112, 62, 150)  # purple nuclei


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Path]]:
    """``module_tmp(name)`` makes a new folder for a module's fixtures; all are deleted when the module is done.

    Training runs hold checkpoints of 90-300 MB (ResNet34 weights and AdamW state): kept to the end of the
    session, as ``tmp_path_factory.mktemp`` keeps them, the suite filled 3 GB of a CI disk.
    """
    made: list[Path] = []

    def make(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, restored afterwards. Their tensors are tiny: on a shared 2-core
    machine two threads waiting on each other made such steps up to 10× slower. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread_everywhere(one_torch_thread):
    """:func:`one_torch_thread`, and ``OMP_NUM_THREADS=1`` for the subprocesses the tests start."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture
def make_slide(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a real pyramidal JPEG TIFF slide under ``tmp_path`` and returning its path.

    ``make_slide(source, name=None, *, size=None, mpp=0.25, layout="aperio", **writer_kwargs)``:
    ``source`` is a uint8 (H, W, 3) array or a region callable (then ``size`` is required); the
    name defaults to ``slide<N>.svs`` (aperio) or ``slide<N>.tiff`` (generic).
    """
    count = 0

    def make(source, name: str | None = None, *, size=None, mpp: float | None = 0.25,
             layout: str = "aperio", **writer_kwargs) -> Path:
        nonlocal count
        count += 1
        path = tmp_path / (name or f"slide{count}.{'svs' if layout == 'aperio' else 'tiff'}")
        write_pyramidal_tiff(path, source, size, mpp=mpp, layout=layout, **writer_kwargs)
        return path

    return make


@pytest.fixture
def he_image() -> Callable[..., np.ndarray]:
    """Factory of H&E-like RGB images: ``he_image(width, height, boxes, seed=0)``.

    Near-white glass with a little noise; inside each (x, y, w, h) box, pink stroma dotted with
    purple nuclei. Deterministic for a given seed.
    """

    def make(width: int, height: int, boxes: Sequence[tuple[int, int, int, int]] = (),
             seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        image = np.empty((height, width, 3), np.float32)
        image[:] = BACKGROUND
        for x, y, w, h in boxes:
            image[y : y + h, x : x + w] = EOSIN
            nuclei = rng.random((h, w)) < 0.15
            image[y : y + h, x : x + w][nuclei] = HAEMATOXYLIN
        image += rng.standard_normal((height, width, 1), dtype=np.float32) * 2.0  # scanner noise
        return np.clip(image + 0.5, 0, 255).astype(np.uint8)

    return make


@pytest.fixture(scope="module")
def trunk() -> ResNetTrunk:
    """A randomly initialised trunk (seed 0), shared by the tests of one module."""
    torch.manual_seed(0)
    return ResNetTrunk()
