"""The README as a newcomer meets it: its own-text commands run as written (at a tiny size), its
links lead to files that exist, and it stays a short page that no script writes into."""
import os
import re
import shlex
import subprocess
import sys

from conftest import REPO, TINY_MODEL_ARGS, tiny_documents

README = os.path.join(REPO, "README.md")
PAGES = ["README.md", "logs/README.md", "tests/BAD_INPUT.md"]
# Appended to each own-text command so that it runs in seconds on a tiny text (later options win).
TINY_OVERRIDES = {
    "prepare.py": ["--vocab_size=300", "--min_val_docs=40"],
    "train.py": ["--max_minutes=0", "--max_iters=2", "--compile=False", *TINY_MODEL_ARGS],
    "sample.py": ["--max_new_tokens=20"],
}


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def own_text_commands():
    """The commands in the README's bash block between the own-text markers, split like a shell."""
    section = re.search(r"<!-- own-text:begin -->\n```bash\n(.*?)```\n<!-- own-text:end -->", read("README.md"), re.S)
    assert section, "README.md has no ```bash block between <!-- own-text:begin --> and <!-- own-text:end -->"
    return [shlex.split(line) for line in section.group(1).splitlines() if line.strip()]


def options(command):
    return dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


def test_own_text_is_prepare_then_train_then_sample_on_the_same_folders():
    prepare, train, sample = own_text_commands()
    assert [c[:2] for c in (prepare, train, sample)] == [["python", "prepare.py"], ["python", "train.py"], ["python", "sample.py"]]
    data, run = options(prepare)["out"], options(train)
    assert run.get("data_dir") == data or "data/" + run.get("dataset", "") == data, "train.py must read prepare.py's --out"
    assert options(sample)["out_dir"] == run["out_dir"], "sample.py must read train.py's --out_dir"


def test_own_text_commands_run_as_written(tmp_path):
    """Each command, with only tiny-size options appended, exits 0 in a fresh folder holding the
    input file the README names; the sample prints text after its prompt."""
    commands = own_text_commands()
    with open(tmp_path / options(commands[0])["input"], "w", encoding="utf-8") as f:
        f.write("\n".join(tiny_documents(400)) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for command in commands:
        script = command[1]
        # the repository's scripts and config files, from a folder that is not the repository
        argv = [sys.executable] + [os.path.join(REPO, a) if a.endswith(".py") else a for a in command[1:]]
        result = subprocess.run(argv + TINY_OVERRIDES[script], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    prompt = options(commands[2])["start"]
    text = result.stdout.split(prompt, 1)
    assert len(text) == 2 and text[1].split("---------------")[0].strip(), result.stdout


def test_readme_is_short_and_has_no_sections_a_script_writes():
    text = read("README.md")
    assert text.count("\n") <= 300
    markers = set(re.findall(r"<!-- ([\w-]+):begin -->", text))
    assert markers == {"own-text"}, "scripts write their own report files, linked from the README"


def heading_anchors(markdown):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as dashes."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_links_lead_to_files_that_exist():
    for page in PAGES:
        folder = os.path.dirname(os.path.join(REPO, page))
        for target in re.findall(r"\]\(([^)\s]+)\)", read(page)):
            if "://" in target:
                continue
            path, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(folder, path)) if path else os.path.join(REPO, page)
            assert os.path.exists(full), f"{page} links to {target}, which does not exist"
            if anchor:
                with open(full, encoding="utf-8") as f:
                    assert anchor in heading_anchors(f.read()), f"{page} links to {target}: no such heading"


def test_the_map_names_every_script_and_module():
    """A newcomer finds every top-level script and every opengpt/ module in the README's map."""
    text = read("README.md")
    names = [n for n in os.listdir(REPO) if n.endswith(".py")]
    names += [n for n in os.listdir(os.path.join(REPO, "opengpt")) if n.endswith(".py") and n != "__init__.py"]
    assert [n for n in sorted(names) if f"`{n}`" not in text] == []
