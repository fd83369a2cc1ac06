"""matplotlib for writing PNG files, set up in one place."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed on servers and in CI).

    Imported on first use rather than at module import: matplotlib takes about half a second to load, and most
    commands draw nothing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
