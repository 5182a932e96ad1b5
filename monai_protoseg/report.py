"""A report (Markdown and self-contained HTML) of a run folder, rendered from the sections its parts build.

Each part owns the code that reads its own files and builds its section (a
:class:`~monai_protoseg.sections.Section` of text, tables and PNG figures): layer-wise and unit-wise SA
(:mod:`monai_protoseg.handlers.sa_report`), prototype maps (:mod:`monai_protoseg.maps`), the quality estimate
(:mod:`monai_protoseg.handlers.quality_report`), attribution (:mod:`monai_protoseg.attribution.report`) and weak
supervision (:mod:`monai_protoseg.weak.report`). :data:`SECTIONS` lists them in report order; this module only
collects the sections (:func:`build_sections`), renders them (:func:`render_markdown`, :func:`render_html`) and
writes the figures, ``report.md`` and ``report.html`` atomically (:func:`write_report`).
"""

from __future__ import annotations

import base64
import html
import os
import pathlib
import re
from collections.abc import Sequence

from .attribution.report import attribution_section
from .handlers.quality_report import inference_section, quality_section
from .handlers.sa_report import layer_section, unit_section
from .io import atomic_write_bytes, atomic_write_text
from .maps import prototype_map_section
from .sections import Block, BulletList, Paragraph, PNGImage, RunFiles, Section, SectionBuilder, Table
from .weak.report import weak_section

__all__ = ["SECTIONS", "build_sections", "render_markdown", "render_html", "write_report"]

SECTIONS: list[SectionBuilder] = [
    layer_section,
    unit_section,
    prototype_map_section,
    quality_section,
    inference_section,
    attribution_section,
    weak_section,
]
"""The report's section builders, in report order. Each reads its part's files in the run folder and returns its
section, or ``None`` when those files are absent; a new section is one more builder in this list."""


def build_sections(run: RunFiles) -> list[Section]:
    """The report's sections for ``run``, a summary of their findings first.

    Args:
        run: the run folder and the report options.

    Returns:
        the sections, in report order.

    Raises:
        FileNotFoundError: ``run.run_dir`` does not exist, or holds neither ``sa_layers.csv`` nor
            ``weak/weak_segmentation.csv``. ValueError: a CSV file is not the expected one, was cut short, or
            holds a value out of range (see :func:`~monai_protoseg.io.read_csv`; the message names the file, and the
            line and column).
    """
    if not run.run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run.run_dir}")
    if not (run.run_dir / "sa_layers.csv").is_file() and not (run.run_dir / "weak" / "weak_segmentation.csv").is_file():
        raise FileNotFoundError(
            f"no SA results in {run.run_dir}: sa_layers.csv is missing (SAScoreHandler(output_dir=...) writes it), "
            f"and so is weak/weak_segmentation.csv (the coin_weak_protoseg bundle's evaluation writes it)."
        )
    sections = [section for build in SECTIONS if (section := build(run)) is not None]
    findings = [line for section in sections for line in section.summary]
    return [Section("Summary", summary=[], blocks=[BulletList(findings)]), *sections]


def render_markdown(sections: Sequence[Section], run_dir: str | os.PathLike) -> str:
    """The report as Markdown; figures are linked by file name (saved beside it by :func:`write_report`)."""
    parts = ["# ProtoSeg report", f"Run folder: `{run_dir}`"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += [_markdown_block(block) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def _markdown_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, BulletList):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        return _markdown_table(block)
    return f"![{block.alt}]({block.filename})"


def _markdown_table(table: Table) -> str:
    """``table`` as a Markdown table."""
    lines = ["| " + " | ".join(table.header) + " |", "|" + "|".join("---:" if r else "---" for r in table.right) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table.rows])


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:64rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
    "table{border-collapse:collapse;font-size:.9rem;display:block;max-width:100%;overflow-x:auto}"
    "th,td{border:1px solid #ccc;padding:.2rem .5rem;vertical-align:top}"
    "th{background:#f3f3f3}td.number{text-align:right}code{background:#f3f3f3;padding:0 .2rem}"
    "img{max-width:100%;height:auto}figure{margin:1rem 0}"
)


def render_html(sections: Sequence[Section], run_dir: str | os.PathLike) -> str:
    """The report as one self-contained HTML5 page: figures embedded as base64 PNG data URIs, the style inline."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ProtoSeg report: {html.escape(pathlib.Path(run_dir).name)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>ProtoSeg report</h1>",
        f"<p>Run folder: <code>{html.escape(str(run_dir))}</code></p>",
    ]
    for section in sections:
        parts += ["<section>", f"<h2>{_inline_html(section.title)}</h2>"]
        parts += [_html_block(block) for block in section.blocks]
        parts.append("</section>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _inline_html(text: str) -> str:
    """``text`` escaped, with `backtick` spans as ``<code>``."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_inline_html(block.text)}</p>"
    if isinstance(block, BulletList):
        return "<ul>\n" + "\n".join(f"<li>{_inline_html(item)}</li>" for item in block.items) + "\n</ul>"
    if isinstance(block, Table):
        return _html_table(block)
    data = base64.b64encode(block.png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.alt)}"></figure>'


def _html_table(table: Table) -> str:
    header = "".join(f"<th>{_inline_html(text)}</th>" for text in table.header)
    rows = []
    for row in table.rows:
        cells = (f'<td class="number">{_inline_html(text)}</td>' if right else f"<td>{_inline_html(text)}</td>"
                 for text, right in zip(row, table.right))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return "\n".join(["<table>", f"<thead><tr>{header}</tr></thead>", "<tbody>", *rows, "</tbody>", "</table>"])


def write_report(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    validation_quality: str = "quality_validation.csv",
    inference_quality: str = "quality.csv",
    active_threshold: float = 0.5,
) -> pathlib.Path:
    """Write the figures, ``report.md`` and the self-contained ``report.html`` for the files found in ``run_dir``.

    The sections are those of :data:`SECTIONS` whose files the run wrote: ``sa_layers.csv`` (this or the
    weak-supervision results must exist) with ``layer_names.csv``, ``sa_units.csv``, ``prototype_maps/``, the
    validation quality CSV (with true Dice; the calibration line is refitted from its rows, which is the fit
    ``MeanSAQualityHandler`` made) and ``quality_cv.csv``, the inference quality CSV (with true Dice too when the
    held-out cases had labels, to show the estimate's error), ``attribution/`` and ``weak/``.

    Args:
        run_dir: the folder a run wrote its CSV files to.
        output_dir: where the report goes; default ``run_dir/report``.
        validation_quality: file name of the quality CSV written during validation.
        inference_quality: file name of the quality CSV written at inference.
        active_threshold: unit SA above which a unit counts as active.

    Returns:
        the path of ``report.md``; ``report.html`` is beside it.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist, or holds neither ``sa_layers.csv`` nor
            ``weak/weak_segmentation.csv``. ValueError: a CSV file is not the expected one, was cut short, or
            holds a value out of range (see :func:`~monai_protoseg.io.read_csv`; the message names the file, and the
            line and column). A file whose every SA is ``nan`` (undefined) is no error: the report says so.
    """
    run = RunFiles(pathlib.Path(run_dir), validation_quality, inference_quality, active_threshold)
    output_dir = run.run_dir / "report" if output_dir is None else pathlib.Path(output_dir)
    sections = build_sections(run)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, PNGImage):
                atomic_write_bytes(output_dir / block.filename, block.png)
    atomic_write_text(output_dir / "report.html", render_html(sections, run.run_dir))
    return atomic_write_text(output_dir / "report.md", render_markdown(sections, run.run_dir))
