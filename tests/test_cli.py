from opengpt import cli


def test_marked_section_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- compare:begin -->\nold table\n<!-- compare:end -->\noutro\n", encoding="utf-8")
    assert cli.replace_marked_section(str(readme), "compare", "| new |\n")
    assert readme.read_text(encoding="utf-8") == "intro\n<!-- compare:begin -->\n| new |\n<!-- compare:end -->\noutro\n"
    assert not cli.replace_marked_section(str(readme), "bench", "x\n")  # no such markers: untouched
    assert not cli.replace_marked_section(str(tmp_path / "missing.md"), "compare", "x\n")


def test_write_atomically_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    def half_write(path):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")
    try:
        cli.write_atomically(str(target), half_write)
    except OSError:
        pass
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind
