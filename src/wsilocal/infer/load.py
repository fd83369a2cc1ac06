"""The predictor of a run directory, by the kind of run it holds (:func:`load_predictor`).

Above both predictors: :mod:`wsilocal.infer.predict` (the method) and :mod:`wsilocal.infer.baseline_predict`
(tile-based MIL baselines) know nothing of each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wsilocal.errors import ConfigError
from wsilocal.infer.baseline_predict import BaselinePredictor
from wsilocal.infer.predict import Predictor
from wsilocal.infer.prediction import SlidePredictor
from wsilocal.run.directory import RunDirectory


def load_predictor(run_dir: str | Path, checkpoint: str = "best", *, device: str = "auto",
                   assume_mpp: float | None = None, memory_budget: int | None = None, band: int | None = None,
                   dtype: torch.dtype = torch.float32, weights: str | Path | None = None) -> SlidePredictor:
    """The predictor of a run directory, whichever kind of run it is.

    A run of the method (``wsilocal train``) gives a :class:`~wsilocal.infer.predict.Predictor`
    (``memory_budget``, ``band`` and ``dtype`` are its options); a tile-based MIL baseline (``wsilocal baseline``)
    gives a :class:`~wsilocal.infer.baseline_predict.BaselinePredictor` (``weights``: where the feature
    extractor's weights file is now, when it moved since the features were extracted). An option of the other
    kind is refused.
    """
    if RunDirectory(run_dir).is_baseline:
        given = [option for option, is_set in (("--memory-budget-gb", memory_budget is not None),
                                               ("--band", band is not None), ("--bf16", dtype != torch.float32))
                 if is_set]
        if given:
            raise ConfigError(f"{run_dir} is a tile-based MIL baseline run: {', '.join(given)} apply only to runs "
                              "of the method (a baseline reads its tiles one batch at a time)")
        return BaselinePredictor.from_run(run_dir, checkpoint, device=device, assume_mpp=assume_mpp, weights=weights)
    if weights is not None:
        raise ConfigError(f"{run_dir} is a run of the method: --weights applies only to baseline runs (the feature "
                          "extractor of their tiles)")
    return Predictor.from_run(run_dir, checkpoint, device=device, memory_budget=memory_budget, assume_mpp=assume_mpp,
                              dtype=dtype, band=band)
