"""Small file helpers: writes that a reader never sees half done, and a CSV reader that refuses a file cut short."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import pathlib
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "find_files", "atomic_write_bytes", "atomic_write_text", "atomic_write_csv", "CSVTable", "read_csv", "format_number"
]


def find_files(folder: str | os.PathLike, pattern: str) -> list[str]:
    """The files in ``folder`` matching the glob ``pattern``, sorted; a clear error when there are none.

    Bundle configs build their data lists with it, so that a wrong ``dataset_dir`` says which folder and pattern were
    searched instead of failing later inside a data loader.

    Args:
        folder: the folder to search.
        pattern: a glob pattern relative to ``folder`` (``"*_ct.nii.gz"``, ``"imagesTr/*.nii.gz"``).

    Returns:
        the matching paths, sorted.

    Raises:
        FileNotFoundError: ``folder`` does not exist, or nothing in it matches ``pattern``.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = atomic_write_text(f"{folder}/a_ct.nii.gz", "")
        >>> [pathlib.Path(path).name for path in find_files(folder, "*_ct.nii.gz")]
        ['a_ct.nii.gz']
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} (check dataset_dir)")
    files = sorted(str(path) for path in folder.glob(pattern) if path.is_file())
    if not files:
        raise FileNotFoundError(f"no file matches {pattern!r} in {folder} (check dataset_dir and the folder layout)")
    return files


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the complete new one, never a part.

    The data goes to a temporary file in the same directory (so that the final rename stays on one file system),
    is flushed to disk, then ``os.replace`` puts it in place in one step. If anything fails, the temporary file is
    removed and an existing ``path`` is left as it was. Missing parent directories are created. A new file gets the
    usual permissions (``0o666`` minus the umask); a replaced file keeps its permission bits.

    Args:
        path: the file to write.
        data: its complete new content.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Example:
        >>> import tempfile
        >>> atomic_write_bytes(f"{tempfile.mkdtemp()}/figure.png", b"\\x89PNG").read_bytes()
        b'\\x89PNG'
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with mode 0o666 lets the umask decide the permissions, as for any new file.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with open(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.chmod(temporary, os.stat(path).st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> pathlib.Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`), as given (no newline translation).

    Args:
        path: the file to write.
        text: its complete new content.
        encoding: text encoding.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> target = atomic_write_text(f"{folder}/sub/notes.txt", "complete\\n")
        >>> target.read_text()
        'complete\\n'
    """
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> pathlib.Path:
    """Write a comma-separated file atomically (see :func:`atomic_write_text`): ``header``, then one line per row.

    Args:
        path: the file to write.
        header: the column names.
        rows: the rows, each with one value per column (written with ``str``; use :func:`format_number` for floats).

    Returns:
        ``path`` as a ``pathlib.Path``.

    Example:
        >>> import tempfile
        >>> atomic_write_csv(f"{tempfile.mkdtemp()}/scores.csv", ["case", "sa"], [["a", "0.5"]]).read_text()
        'case,sa\\na,0.5\\n'
    """
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())


def write_json(path: str | os.PathLike, data: Any) -> pathlib.Path:
    """Write ``data`` to ``path`` as indented JSON, atomically; NaN and Inf are refused (they are not JSON).

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike, kind: str) -> Any:
    """Read the JSON file ``path`` holding a ``kind`` (e.g. ``"QualityCalibration"``), for error messages.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it and ``kind``).
        ValueError: the file is not UTF-8 text or not valid JSON; the message names the file, ``kind`` and the reason.
    """
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"no {kind} file at {path}") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a {kind} JSON file: it is not UTF-8 text ({error}).") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a {kind} JSON file: invalid JSON ({error}).") from error


@dataclass(frozen=True)
class CSVTable:
    """The rows of a CSV file read by :func:`read_csv`, and the line each came from, for error messages.

    Attributes:
        path: the file.
        columns: the column names of its header, in order.
        rows: one ``{column: cell}`` dict per data row.
        lines: the line of the file each row ends on (1-based, the header is line 1).
    """

    path: pathlib.Path
    columns: list[str]
    rows: list[dict[str, str]]
    lines: list[int]

    def floats(self, column: str, low: float = 0.0, high: float = 1.0) -> np.ndarray:
        """The cells of ``column`` as float64: each a number in ``[low, high]`` or ``nan`` (undefined).

        The default range is that of a Dice-like score (SA, Dice, IoU, accuracy), what most columns hold.

        Args:
            column: a column of the header.
            low: the smallest value allowed.
            high: the largest value allowed (``math.inf``: any finite number from ``low`` up).

        Returns:
            ``(rows,)`` float64 array.

        Raises:
            ValueError: a cell is not a number, is infinite, or is out of range; the message names the file, the line
                and the column.
        """
        values = np.empty(len(self.rows), dtype=np.float64)
        for i, row in enumerate(self.rows):
            try:
                value = float(row[column])
            except ValueError:
                raise self._error(i, column, "is not a number (nan marks an undefined one)") from None
            if math.isinf(value):
                raise self._error(i, column, "is not finite")
            if not low <= value <= high and not math.isnan(value):
                bounds = f"is below {low:g}" if math.isinf(high) else f"is outside [{low:g}, {high:g}]"
                raise self._error(i, column, bounds)
            values[i] = value
        return values

    def integers(self, column: str) -> np.ndarray:
        """The cells of ``column`` as int64, each a whole number >= 0 (a count).

        Raises:
            ValueError: a cell is not; the message names the file, the line and the column.
        """
        values = self.floats(column, 0.0, math.inf)
        for i, value in enumerate(values):
            if not value.is_integer():  # NaN included
                raise self._error(i, column, "is not a whole number >= 0")
        return values.astype(np.int64)

    def booleans(self, column: str) -> np.ndarray:
        """The cells of ``column`` as bool: ``True`` or ``False``, in any case (Excel writes ``TRUE``).

        Raises:
            ValueError: a cell is neither; the message names the file, the line and the column.
        """
        cells = [row[column].strip().lower() for row in self.rows]
        for i, cell in enumerate(cells):
            if cell not in ("true", "false"):
                raise self._error(i, column, "is not True or False")
        return np.array([cell == "true" for cell in cells], dtype=bool)

    def _error(self, row: int, column: str, reason: str) -> ValueError:
        """The error for the cell of ``column`` in row ``row``: the file, its line, the column, ``reason``, the cell."""
        return ValueError(f"{self.path}, line {self.lines[row]}: column {column!r} holds a value that {reason}: "
                          f"{self.rows[row][column]!r}.")


def read_csv(path: str | os.PathLike, required: Sequence[str] = ()) -> CSVTable:
    """Read a comma-separated file with a header, refusing one that was cut short or is malformed.

    The file is UTF-8, with or without the byte-order mark Excel writes; lines end with ``\\n``, ``\\r\\n`` or
    ``\\r``; blank lines are skipped. Since every line of a complete file ends with a line break (the last one too, as
    :func:`atomic_write_csv` and spreadsheet programs write it), a file whose last line does not was cut short (a full
    disk, an interrupted copy) and is refused: its last cell may have lost digits (``0.389`` read as ``0``). A file cut
    exactly at a line break cannot be told from a complete one.

    Args:
        path: the file.
        required: columns it must have.

    Returns:
        the header and the rows; read cells as numbers with :meth:`CSVTable.floats` and the like.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not UTF-8 text; cut short; a line that is not valid CSV (an unclosed quote); a header that names a
            column twice or lacks a required one; a row with more or fewer cells than the header; no rows. The message
            names the file and, where there is one, the line.

    Example:
        >>> import tempfile
        >>> path = atomic_write_csv(f"{tempfile.mkdtemp()}/scores.csv", ["case", "sa"], [["a", "0.5"], ["b", "nan"]])
        >>> read_csv(path, ["case", "sa"]).floats("sa")
        array([0.5, nan])
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not a readable CSV file (not UTF-8 text: {error}).") from error
    if text and not text.endswith(("\n", "\r")):
        lines = sum(1 for _ in io.StringIO(text, newline=""))
        raise ValueError(f"{path}, line {lines}: the file ends inside this line (no line break after it), so it was "
                         f"cut short (a full disk, an interrupted copy); write or copy it again.")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, lines = [], []
    try:
        header = next(reader, [])
        for name in header:
            if header.count(name) > 1:
                raise ValueError(f"{path}, line 1: column {name!r} appears twice in the header.")
        missing = [column for column in required if column not in header]
        if missing:
            raise ValueError(f"{path} is not the expected CSV: it has no column(s) {', '.join(missing)}.")
        for cells in reader:
            if not cells:
                continue
            if len(cells) != len(header):
                raise ValueError(f"{path}, line {reader.line_num}: the number of cells differs from the header's "
                                 f"{len(header)} columns ({len(cells)} cells).")
            rows.append(dict(zip(header, cells)))
            lines.append(reader.line_num)
    except csv.Error as error:
        raise ValueError(f"{path}, line {reader.line_num}: not a valid CSV line ({error}).") from error
    if not rows:
        raise ValueError(f"{path} has no rows.")
    return CSVTable(path, header, rows, lines)


def format_number(value: Any) -> str:
    """A score for a CSV cell: six decimals, ``nan`` where undefined.

    Example:
        >>> format_number(0.5), format_number(float("nan"))
        ('0.500000', 'nan')
    """
    value = float(value)
    return "nan" if math.isnan(value) else f"{value:.6f}"


def _sync_directory(directory: pathlib.Path) -> None:
    """Flush a directory entry to disk so that a completed rename survives a power loss (POSIX; best effort)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
