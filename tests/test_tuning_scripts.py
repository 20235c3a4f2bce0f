"""The lab notebook's shell scripts (logs/*.sh) report a failed train.py and keep what they wrote
before. Run against a stand-in for python (its train.py run prints a last line and succeeds or
fails), each from a copy of the script in a folder of its own, so no model trains here."""
import os
import shutil
import subprocess

import pytest

from conftest import REPO

FAKE_PYTHON = r"""#!/usr/bin/env bash
# $FAKE_TRAIN: ok | fail, how this stand-in's train.py run ends
if [ "$FAKE_TRAIN" = ok ]; then echo "step 1562: train loss 5.0, val 5.500 bits/char"; exit 0; fi
echo "train.py: error: data/zh_default not found; run: python prepare.py" >&2
exit 2
"""


def run_script(tmp_path, script, args, fake_train, env=None):
    """`logs/SCRIPT ARGS > results.txt 2>&1` in a copy of logs/ under tmp_path; returns (exit status, results.txt)."""
    (tmp_path / "logs").mkdir(exist_ok=True)
    shutil.copy(os.path.join(REPO, "logs", script), tmp_path / "logs" / script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", FAKE_TRAIN=fake_train, **(env or {}))
    results = tmp_path / "results.txt"
    command = f"bash logs/{script} {' '.join(args)} > {results} 2>&1"
    status = subprocess.run(command, shell=True, cwd=tmp_path, env=env, timeout=60).returncode
    return status, results.read_text(encoding="utf-8")


@pytest.mark.parametrize("fresh_checkout", [True, False])
def test_the_hessian_batch_script_writes_each_run_then_the_means_into_one_file(tmp_path, fresh_checkout):
    if not fresh_checkout:
        (tmp_path / "out-hessian-batch").mkdir()
    status, results = run_script(tmp_path, "hessian_batch_equal_steps.sh", [], "ok", dict(SEEDS="1 2"))
    assert status == 0, results
    lines = results.splitlines()
    assert lines[:4] == [f"hessian_batch={mode} seed={seed} val_bits_per_char=5.500" for seed in (1, 2) for mode in ("fresh", "step")]
    assert sorted(lines[4:]) == ["hessian_batch=fresh mean over 2 seeds: 5.500", "hessian_batch=step mean over 2 seeds: 5.500"]


def test_the_hessian_batch_script_says_which_run_failed_and_how(tmp_path):
    (tmp_path / "out-hessian-batch").mkdir()  # not the missing folder's error
    status, results = run_script(tmp_path, "hessian_batch_equal_steps.sh", [], "fail", dict(SEEDS="1"))
    assert status != 0
    assert results == "hessian_batch=fresh seed=1: train.py failed: train.py: error: data/zh_default not found; run: python prepare.py\n"


@pytest.mark.parametrize("script, log", [("recipe_tuning.sh", "logs/speedrun/tuning/base/train.log"),
                                         ("zh_large_tuning.sh", "logs/speedrun/zh_large/tuning/base/train.log")])
def test_a_failed_tuning_run_says_why_and_keeps_the_committed_log(tmp_path, script, log):
    committed = tmp_path / log
    committed.parent.mkdir(parents=True)
    committed.write_text("step 1000: val 5.123 bits/char\n", encoding="utf-8")
    status, results = run_script(tmp_path, script, ["base", "--bad_flag"], "fail")
    assert status != 0
    assert results == f"logs/{script} base: train.py failed: train.py: error: data/zh_default not found; run: python prepare.py\n"
    assert committed.read_text(encoding="utf-8") == "step 1000: val 5.123 bits/char\n"
    assert os.listdir(committed.parent) == ["train.log"]  # no temp log left


def test_a_finished_tuning_run_replaces_its_log_and_appends_its_result(tmp_path):
    status, results = run_script(tmp_path, "recipe_tuning.sh", ["base", "--n_layer=4"], "ok")
    assert status == 0, results
    folder = tmp_path / "logs" / "speedrun" / "tuning"
    assert (folder / "base" / "train.log").read_text(encoding="utf-8") == "step 1562: train loss 5.0, val 5.500 bits/char\n"
    assert (folder / "results.txt").read_text(encoding="utf-8") == "base --n_layer=4: step 1562: train loss 5.0, val 5.500 bits/char\n"
    assert os.listdir(folder / "base") == ["train.log"]
