"""Small file helpers: writes that a reader never sees half done."""

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
from typing import Any

__all__ = ["find_files", "atomic_write_bytes", "atomic_write_text", "atomic_write_csv", "format_number"]


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
