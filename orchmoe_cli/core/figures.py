"""The one way orchmoe gets matplotlib: the Agg backend (no display needed) and text drawn as written.

Task and run names are user data: a name like ``price_$5_to_$10`` would otherwise be read as mathtext and fail the
whole figure, so math parsing is off for every figure orchmoe draws.
"""

from __future__ import annotations

from typing import Any


def pyplot() -> Any:
    """``matplotlib.pyplot``, imported on first use (plots are optional work after the numbers are written)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False
    import matplotlib.pyplot as plt

    return plt
