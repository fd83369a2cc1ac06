"""wsilocal: whole-slide image classification with locally supervised learning.

Data flows one way through the sub-packages:
``slide`` (files → 5x tissue images, cohorts, cache) → ``models`` (trunk, modules, heads)
→ ``train`` (local learning, checkpoints, metrics) → ``infer`` (prediction, heatmaps) → ``bench``.
"""

from wsilocal.errors import WsilocalError

__version__ = "0.1.0"
__all__ = ["WsilocalError", "__version__"]
