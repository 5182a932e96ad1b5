"""What a benchmark returns and how it is written as Markdown: measurement tables, figures derived from them with
their targets, the command that reproduces them, and the machine they ran on."""

from __future__ import annotations

import math
import operator
import os
import platform
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

import monai
import torch

COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le}
"""How a figure must compare with its target."""


def number(value: float, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits in plain notation (``3456``, ``27.61``, ``0.07123``); NaN as -."""
    if math.isnan(value):
        return "-"
    if value == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def command(script: str, argv: Sequence[str]) -> str:
    """The shell command that runs ``benchmarks/{script}`` with ``argv`` from the repository root."""
    return shlex.join([".venv/bin/python", f"benchmarks/{script}", *argv])


@dataclass(frozen=True)
class Check:
    """A figure derived from a benchmark's measurements and, where one was set, the target it must meet."""

    name: str
    value: float
    unit: str = "x"
    target: float | None = None
    comparison: str = ">="

    @property
    def met(self) -> bool | None:
        """Whether ``value`` meets the target; None without a target."""
        return None if self.target is None else COMPARISONS[self.comparison](self.value, self.target)

    def cells(self) -> list[str]:
        """Figure, value, target and verdict (``met``, ``NOT MET`` or ``-`` without a target) as table cells."""
        target = "-" if self.target is None else f"{self.comparison} {self.target:g}{self.unit}"
        verdict = {None: "-", True: "met", False: "NOT MET"}[self.met]
        return [self.name, f"{number(self.value)}{self.unit}", target, verdict]


@dataclass(frozen=True)
class Table:
    """A Markdown table of formatted cells, with an optional title line."""

    columns: list[str]
    rows: list[list[str]]
    title: str = ""
    align: str = ""
    """One letter per column, ``l`` or ``r``; by default the first column left-aligned and the others right."""

    def markdown(self) -> str:
        """The table, preceded by its title line when it has one."""
        align = self.align or "l" + "r" * (len(self.columns) - 1)
        lines = [self.title, ""] if self.title else []
        lines += ["| " + " | ".join(self.columns) + " |", "|" + "".join({"l": "---|", "r": "---:|"}[a] for a in align)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


CHECK_COLUMNS = ["figure", "value", "target", "result"]


@dataclass(frozen=True)
class BenchmarkResult:
    """What one benchmark run measured, the command that reproduces it alone, and how long it took."""

    name: str
    title: str
    command: str
    description: str
    tables: list[Table]
    checks: list[Check]
    seconds: float

    def markdown(self) -> str:
        """A Markdown section: title, command and duration, settings, measurement tables, derived figures."""
        parts = [f"## {self.title}", f"`{self.command}` ({self.seconds:.0f} s). {self.description}"]
        parts += [table.markdown() for table in self.tables]
        parts.append(Table(CHECK_COLUMNS, [check.cells() for check in self.checks], align="lrrl").markdown())
        return "\n\n".join(parts)


def memory_gib() -> str:
    """Total physical memory in GiB, or ``unknown`` where the OS does not say."""
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"
    except (AttributeError, ValueError, OSError):
        return "unknown"


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_details() -> dict[str, str]:
    """CPU, memory, OS, load, Python, torch (with its CPU threads), MONAI and CUDA device, as name -> text."""
    if torch.cuda.is_available():
        cuda = f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} device(s), CUDA {torch.version.cuda})"
    else:
        cuda = "none"
    load = " / ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return {
        "CPU": f"{cpu_model()} ({platform.machine()}), {os.cpu_count()} logical CPUs",
        "RAM": memory_gib(),
        "OS": platform.platform(),
        "load average (1/5/15 min)": load,
        "Python": platform.python_version(),
        "torch": f"{torch.__version__}, {torch.get_num_threads()} CPU threads",
        "MONAI": monai.__version__,
        "CUDA device": cuda,
    }


def machine_line() -> str:
    """The machine details on one line, as each benchmark prints them first."""
    return "machine: " + "; ".join(f"{name} {value}" for name, value in machine_details().items())
