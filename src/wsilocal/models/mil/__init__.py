"""Tile-based MIL baselines of the paper's Table 1 (plus TransMIL), one file per family.

Each takes one bag of tile features (N, in_dim) and returns a :class:`MILOutput`; see ``base`` for the
trainer contract (loss, stages, optimiser defaults). ``build_mil_model(name, n_classes)`` makes one by name.
"""

from __future__ import annotations

import inspect

from wsilocal.errors import ConfigError
from wsilocal.models.mil.abmil import ABMIL, GatedABMIL
from wsilocal.models.mil.base import MILModel, MILOutput
from wsilocal.models.mil.clam import CLAMMB, CLAMSB
from wsilocal.models.mil.dsmil import DSMIL
from wsilocal.models.mil.milrnn import MILRNN
from wsilocal.models.mil.pooling import MaxPoolMIL, MeanPoolMIL
from wsilocal.models.mil.transmil import TransMIL

MIL_MODELS: dict[str, type[MILModel]] = {
    model.name: model
    for model in (MaxPoolMIL, MeanPoolMIL, ABMIL, GatedABMIL, DSMIL, CLAMSB, CLAMMB, MILRNN, TransMIL)
}


def build_mil_model(name: str, n_classes: int, in_dim: int = 512, **kwargs) -> MILModel:
    """The MIL model ``name`` (a key of MIL_MODELS) for ``n_classes`` classes and ``in_dim``-d features.

    ``kwargs`` are the model's own options (e.g. ``k_sample`` for CLAM, ``class_weights`` for all).
    Raises ConfigError for an unknown name or option, or a class count the model does not support.
    """
    if name not in MIL_MODELS:
        raise ConfigError(f"unknown MIL model '{name}'; choose one of: {', '.join(MIL_MODELS)}")
    model_class = MIL_MODELS[name]
    options = set(inspect.signature(model_class.__init__).parameters) - {"self", "n_classes", "in_dim"}
    unknown = sorted(set(kwargs) - options)
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(options))}")
    return model_class(n_classes, in_dim, **kwargs)


__all__ = ["MIL_MODELS", "MILModel", "MILOutput", "build_mil_model"]
