"""--help on every script a user runs: each option with its default and its comment, exit 0, nothing run."""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_script

# (script, an option line it must print: --name=default, then the comment beside it in DEFAULTS)
SCRIPTS = [
    ("train.py", "--data_dir=''", "default data/<dataset>"),
    ("train_adam.py", "--optimizer=adamw", "adamw | sophiag | muon"),
    ("train_sophiag.py", "--optimizer=sophiag", "adamw | sophiag | muon"),
    ("prepare.py", "--val_fraction=0.005", "the chance that a document is val"),
    ("prepare_chat.py", "--skip_bad_records=False", "skip (and count) records that cannot be used"),
    ("sample.py", "--temperature=0.8", "0 = greedy"),
    ("chat.py", "--system=''", "the system prompt"),
    ("serve.py", "--host=127.0.0.1", "127.0.0.1: this machine only"),
    ("eval.py", "--max_batches=0", "val batches to evaluate; 0 = the whole split"),
    ("export.py", "--overwrite=False", "replace a non-empty export_dir"),
    ("bench.py", "--repeats=3", "processes per training case"),
    ("gpu_check.py", "--dry_run=False", "the CPU, float32, no compile"),
    ("logs/speedrun.py", "--minutes=10.0", "the speedrun's budget per run"),
    ("logs/compare_optimizers.py", "--workers=2", "runs at a time"),
    ("logs/bench_prepare.py", "--size_mb=1000", "corpus size in MB of JSONL"),
    ("logs/step_side_by_side.py", "--extra=''", "flags for this checkout's runs only"),
    ("logs/sentiment_task.py", "--test_reviews=2000", "held out for scoring, drawn with `seed`"),
    ("logs/document_mask_speed.py", "--document_tokens=96", "mean tokens per document in the random batches"),
]


@pytest.mark.parametrize("script, option, comment", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_help_lists_each_option_with_its_default_and_comment(script, option, comment, tmp_path):
    result = run_script(script, "--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    command = f"python -m {script[:-3].replace('/', '.')}" if script.startswith("logs/") else f"python {script}"
    assert result.stdout.startswith(f"usage: {command} [CONFIG_FILE ...] [--KEY=VALUE ...]\n")
    assert re.search(rf"^  {re.escape(option)} +{re.escape(comment)}", result.stdout, re.M), result.stdout
    assert os.listdir(tmp_path) == []  # nothing ran: no data, checkpoint or report folder was made


def test_train_help_shows_the_data_options_under_their_section(tmp_path):
    result = run_script("train.py", "-h", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    data_section = result.stdout.split("  # data\n", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"^  --dataset=zh_default\b", data_section, re.M)
    assert re.search(r"^  --data_dir='' +default data/<dataset>$", data_section, re.M)


def test_help_comes_before_any_other_argument_is_read(tmp_path):
    result = run_script("prepare.py", "no_such_config.py", "--no_such_option=1", "--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--val_fraction=0.005" in result.stdout and os.listdir(tmp_path) == []


def test_plot_loss_help_names_its_runs_and_options(tmp_path):
    result = run_script("logs/plot_loss.py", "--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "RUN" in result.stdout and "a metrics.jsonl, a run folder holding one" in result.stdout
    assert re.search(r"--out OUT +image to write", result.stdout)
    assert os.listdir(tmp_path) == []


BY_PATH = ["speedrun", "sentiment_task", "step_side_by_side", "decode_side_by_side", "bench_prepare", "compare_optimizers",
           "plot_loss", "ngram_bound", "document_mask_speed"]


def test_the_notebooks_scripts_run_by_path_as_well_as_with_python_m(tmp_path):
    """`python logs/X.py --help` finds the repository's modules as `python -m logs.X --help` does."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    for name in BY_PATH:
        result = subprocess.run([sys.executable, os.path.join(REPO, "logs", f"{name}.py"), "--help"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage:" in result.stdout, (name, result.stderr)
    assert os.listdir(tmp_path) == []
