"""Atomic writes: a reader sees the old file or the complete new one; nothing is lost when a write fails."""

from __future__ import annotations

import os

import pytest

from monai_protoseg.io import atomic_write_bytes, atomic_write_csv, atomic_write_text, format_number


def test_atomic_write_creates_parents_and_replaces_a_file(tmp_path):
    path = tmp_path / "a" / "b" / "out.txt"
    assert atomic_write_text(path, "first\n") == path
    assert path.read_text() == "first\n"
    atomic_write_text(str(path), "second\r\nline ü")
    assert path.read_bytes() == "second\r\nline ü".encode()  # written as given, no newline translation
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_write_keeps_the_mode_of_a_replaced_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.stat().st_mode & 0o777 == 0o640 and path.read_text() == "new"


def test_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "café \udcff", encoding="ascii")  # fails while writing the temporary file
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_bytes_and_csv(tmp_path):
    assert atomic_write_bytes(tmp_path / "figure.png", b"\x89PNG").read_bytes() == b"\x89PNG"
    rows = [["a,b", format_number(1 / 3)], ["c", format_number(float("nan"))]]
    assert atomic_write_csv(tmp_path / "s.csv", ["case", "sa"], rows).read_text() == 'case,sa\n"a,b",0.333333\nc,nan\n'


def test_find_files_sorts_and_names_what_is_missing(tmp_path):
    from monai_protoseg.io import find_files

    for name in ("b_ct.nii.gz", "a_ct.nii.gz", "a_seg.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    assert find_files(tmp_path, "*_ct.nii.gz") == [str(tmp_path / "a_ct.nii.gz"), str(tmp_path / "b_ct.nii.gz")]
    with pytest.raises(FileNotFoundError, match=r"no file matches '\*\.jpg' in .* \(check dataset_dir"):
        find_files(tmp_path, "*.jpg")
    with pytest.raises(FileNotFoundError, match="no folder .*absent"):
        find_files(tmp_path / "absent", "*.jpg")
