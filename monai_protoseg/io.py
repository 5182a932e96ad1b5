"""Small file helpers: writes that a reader never sees half done."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets

__all__ = ["atomic_write_text"]


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> pathlib.Path:
    """Write ``text`` to ``path`` atomically: a reader sees the old file or the complete new one, never a part.

    The text goes to a temporary file in the same directory (so that the final rename stays on one file system),
    is flushed to disk, then ``os.replace`` puts it in place in one step. If anything fails, the temporary file is
    removed and an existing ``path`` is left as it was. Missing parent directories are created. The text is written
    as given (no newline translation). A new file gets the usual permissions (``0o666`` minus the umask); a replaced
    file keeps its permission bits.

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
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open with mode 0o666 lets the umask decide the permissions, as for any new file.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with open(descriptor, "w", encoding=encoding, newline="") as stream:
            stream.write(text)
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
