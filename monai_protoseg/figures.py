"""Figure helpers shared by every part that draws (SA, quality, attribution, weak supervision): PNG bytes of a
matplotlib ``Figure``, saved atomically, and axis labels short enough to read. Figures are made without pyplot, so no
backend or global state is touched. This module imports no part of the package but :mod:`monai_protoseg.io`.
"""

from __future__ import annotations

import io
import os
import pathlib
from typing import TYPE_CHECKING

from .io import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["figure_png", "save_figure", "short_label"]


def figure_png(figure: Figure, dpi: int = 110) -> bytes:
    """``figure`` as PNG bytes.

    Example:
        >>> from matplotlib.figure import Figure
        >>> figure_png(Figure(figsize=(1, 1)))[:4]
        b'\\x89PNG'
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 110) -> pathlib.Path:
    """Save ``figure`` as PNG atomically.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    return atomic_write_bytes(path, figure_png(figure, dpi))


def short_label(text: str, width: int = 24) -> str:
    """``text`` for an axis tick or a panel title: as it is when it fits in ``width`` characters, else its longest
    dotted suffix that fits after ``…`` (whole name parts, never a cut word), or its last part.

    Example:
        >>> short_label("model.1.submodule.1.submodule.2", 20)
        '…1.submodule.2'
    """
    if len(text) <= width:
        return text
    parts = text.split(".")
    for start in range(1, len(parts)):
        suffix = ".".join(parts[start:])
        if len(suffix) < width:
            return "…" + suffix
    return "…" + parts[-1][-(width - 1):]
