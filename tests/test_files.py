"""opengpt/files.py: atomic writes, data files inside installed packages."""
import os

from opengpt import files


def test_write_atomically_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    def half_write(path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    try:
        files.write_atomically(str(target), half_write)
    except OSError:
        pass
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


def test_write_text_replaces_the_file_whole_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text("old", encoding="utf-8")
    files.write_text(str(target), "新的\n")
    assert target.read_text(encoding="utf-8") == "新的\n"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_package_data_file_finds_a_file_inside_an_installed_package():
    import json as package  # any installed package with a folder

    path = files.package_data_file("json", "decoder.py")
    assert path == os.path.join(os.path.dirname(package.__file__), "decoder.py")
    assert files.package_data_file("json", "no/such/file.txt") is None
    assert files.package_data_file("no_such_package_here", "x.txt") is None
