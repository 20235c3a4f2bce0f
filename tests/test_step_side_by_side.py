"""logs/step_side_by_side.py: its mistakes are one line each, and a failed checkout leaves no worktree."""
import subprocess

from conftest import REPO, assert_user_error, run_script


def worktrees():
    return subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True, text=True).stdout


def test_too_few_steps_to_time_is_one_line():
    assert_user_error(run_script("logs/step_side_by_side.py", "--iters=30"), "--iters")


def test_an_unknown_base_commit_is_one_line_and_leaves_no_worktree():
    before = worktrees()
    assert_user_error(run_script("logs/step_side_by_side.py", "--base=no-such-commit-anywhere"), "--base=no-such-commit-anywhere")
    assert worktrees() == before
