"""What a report is made of: the blocks of a section (text, tables, figures), a :class:`Section`, and what a section
builder reads (:class:`RunFiles`). Each part of the package (SA, units, prototype maps, quality, attribution, weak
supervision) builds its own section from its own files; :mod:`monai_protoseg.report` lists the builders and renders
their sections. Text in blocks is plain text in which `backticks` mark code (layer names, file names), in both
renderings.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Paragraph", "BulletList", "Table", "PNGImage", "Block", "Section", "RunFiles", "SectionBuilder",
           "number_cell"]


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of text."""

    text: str


@dataclass(frozen=True)
class BulletList:
    """A bulleted list, one text per item."""

    items: list[str]


@dataclass(frozen=True)
class Table:
    """A table of text cells; ``right[i]`` aligns column ``i`` right (numbers)."""

    header: list[str]
    rows: list[list[str]]
    right: list[bool]


@dataclass(frozen=True)
class PNGImage:
    """A figure: saved as ``filename`` beside ``report.md``, embedded as a data URI in ``report.html``."""

    filename: str
    alt: str
    png: bytes


Block = Paragraph | BulletList | Table | PNGImage


@dataclass(frozen=True)
class Section:
    """One section of the report.

    Attributes:
        title: its heading.
        summary: its key findings, one sentence each; the report's summary at the top collects them.
        blocks: its content, in order.
    """

    title: str
    summary: list[str]
    blocks: list[Block]


@dataclass(frozen=True)
class RunFiles:
    """What a section builder reads: the run folder and the report options.

    Attributes:
        run_dir: the folder a run wrote its CSV files to.
        validation_quality: file name of the quality CSV written during validation.
        inference_quality: file name of the quality CSV written at inference.
        active_threshold: unit SA above which a unit counts as active.
    """

    run_dir: pathlib.Path
    validation_quality: str = "quality_validation.csv"
    inference_quality: str = "quality.csv"
    active_threshold: float = 0.5


SectionBuilder = Callable[[RunFiles], "Section | None"]
"""A part's section builder: its section from the run's files, or ``None`` when its files are absent."""


def number_cell(value: float, digits: int = 3) -> str:
    """A table cell for ``value``: ``digits`` decimals, ``-`` for NaN.

    Example:
        >>> number_cell(0.12345), number_cell(float("nan"))
        ('0.123', '-')
    """
    return "-" if value != value else f"{value:.{digits}f}"
