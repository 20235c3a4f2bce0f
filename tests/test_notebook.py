"""The Colab notebook runs top to bottom: executed here in smoke mode (CPU, a few steps per run)."""
import json
import os
import subprocess
import sys
import zipfile

import nbformat
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOK = os.path.join(REPO, "colab", "gpt_pretraining_on_gpt-tiny.ipynb")


def cell_text(cell):
    """Everything a code cell printed, as one string."""
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} has outputs: clear them"


def test_notebook_runs_in_smoke_mode_and_plots_and_samples(tmp_path, monkeypatch):
    # the kernel inherits this environment; OMP_NUM_THREADS=1 keeps the shared CPUs to one thread each
    monkeypatch.setenv("SMOKE", "1")
    monkeypatch.setenv("WORK_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # raises CellExecutionError, naming the cell, if any cell fails
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    cells = {cell.id: cell for cell in nb.cells}

    setup = cell_text(cells["setup"])
    assert f"working in {REPO}" in setup
    assert "$ git clone" not in setup and "install.sh" not in setup  # smoke mode neither clones nor installs

    for optimizer in ("adamw", "sophiag"):
        with open(tmp_path / optimizer / "metrics.jsonl", encoding="utf-8") as f:
            events = [json.loads(line) for line in f]
        config = events[0]["config"]
        assert (config["optimizer"], config["device"], config["dtype"]) == (optimizer, "cpu", "float32")
        assert config["data_dir"] == str(tmp_path / "data")  # not the repository's data/zh_default
        assert [e["iter"] for e in events if e["event"] == "eval"] == [0, 10, 20]

    plot = tmp_path / "loss.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("image/png" in out.get("data", {}) for out in cells["plot"].outputs), "the plot is shown inline"

    samples = cell_text(cells["sample"])
    texts = [line for line in samples.splitlines() if line.startswith("滚滚长江")]
    assert len(texts) == 2, samples  # one sample from each model: the prompt, then what the model wrote
    assert all(len(text) > len("滚滚长江") for text in texts), samples
    assert "=== adamw ===" in samples and "=== sophiag ===" in samples



def fresh_runtime_setup(tmp_path, repo_url=""):
    """The notebook's parameter and setup cells, run as on a fresh Colab runtime (not inside the
    repository, SMOKE unset) in tmp_path; the CompletedProcess."""
    cells = {cell.id: cell for cell in nbformat.read(NOTEBOOK, as_version=4).cells}
    source = cells["parameters"].source + "\n" + cells["setup"].source
    assert 'REPO_URL = ""' in source
    source = source.replace('REPO_URL = ""', f"REPO_URL = {repo_url!r}")
    env = {k: v for k, v in os.environ.items() if k not in ("SMOKE", "WORK_DIR")}
    return subprocess.run([sys.executable, "-c", source], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def fake_repository(folder):
    """A stand-in for the repository: train.py, and an install.sh that only says it ran."""
    folder.mkdir(parents=True)
    (folder / "train.py").write_text("")
    (folder / "install.sh").write_text("echo install.sh ran with $PYTHON\n")
    return folder


def test_a_fresh_runtime_without_a_repository_url_says_how_to_give_one(tmp_path):
    result = fresh_runtime_setup(tmp_path)
    assert result.returncode != 0
    assert "set REPO_URL in the Parameters cell" in result.stderr and "upload" in result.stderr
    assert not (tmp_path / "open-gpt-training").exists()


def test_a_fresh_runtime_clones_the_repository_url(tmp_path):
    origin = fake_repository(tmp_path / "origin")
    for command in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *command], cwd=origin, check=True)
    runtime = tmp_path / "content"
    runtime.mkdir()
    result = fresh_runtime_setup(runtime, repo_url=origin.as_uri())
    assert result.returncode == 0, result.stderr
    assert f"working in {runtime / 'open-gpt-training'}" in result.stdout and "install.sh ran with" in result.stdout


def test_a_fresh_runtime_unpacks_an_uploaded_zip(tmp_path):
    source = fake_repository(tmp_path / "src" / "open-gpt-training-main")
    runtime = tmp_path / "content"
    runtime.mkdir()
    with zipfile.ZipFile(runtime / "open-gpt-training-main.zip", "w") as archive:  # as GitHub's "Download ZIP"
        for path in source.iterdir():
            archive.write(path, f"open-gpt-training-main/{path.name}")
    result = fresh_runtime_setup(runtime)
    assert result.returncode == 0, result.stderr
    assert f"working in {runtime / 'open-gpt-training'}" in result.stdout and "install.sh ran with" in result.stdout
    assert sorted(p.name for p in runtime.iterdir()) == ["open-gpt-training", "open-gpt-training-main.zip"]
