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


def test_both_checkouts_train_the_first_recipe_whatever_the_config_says_today(monkeypatch, tmp_path):
    from logs import step_side_by_side
    commands = []

    def fake_run(command, cwd, capture_output, text):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "stopped by the test")

    monkeypatch.setattr(step_side_by_side.subprocess, "run", fake_run)
    cfg = dict(step_side_by_side.DEFAULTS)
    try:
        step_side_by_side.train(str(tmp_path), str(tmp_path / "out"), cfg, [])
    except step_side_by_side.UserError:
        pass
    assert commands[0][-4:] == ["--n_layer=2", "--batch_size=16", "--optimizer=adamw", "--dataset=zh_default"]


def test_this_checkout_trains_the_first_recipes_model_whatever_the_config_says_today():
    import os

    import train
    from configurator import parse_args
    from logs import step_side_by_side

    flags = step_side_by_side.FIRST_RECIPE + step_side_by_side.this_checkouts_flags(dict(step_side_by_side.DEFAULTS))
    cfg = parse_args(train.DEFAULTS, [os.path.join(REPO, "config", "train_zh_speedrun.py"), *flags])
    # 7f4ced9's recipe: 2 layers of 128, 16 windows of 128 tokens, AdamW, learned positions
    assert (cfg["n_layer"], cfg["n_embd"], cfg["batch_size"], cfg["block_size"]) == (2, 128, 16, 128)
    assert cfg["optimizer"] == "adamw" and cfg["rotary"] is False and cfg["dataset"] == "zh_default"


def test_todays_recipe_is_the_config_as_it_stands_for_both_checkouts(monkeypatch, tmp_path):
    from logs import step_side_by_side
    commands = []

    def fake_run(command, cwd, capture_output, text):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "stopped by the test")

    monkeypatch.setattr(step_side_by_side.subprocess, "run", fake_run)
    cfg = dict(step_side_by_side.DEFAULTS, recipe="today", extra="--compile=False")
    for extra in ([], step_side_by_side.this_checkouts_flags(cfg)):
        try:
            step_side_by_side.train(str(tmp_path), str(tmp_path / "out"), cfg, extra)
        except step_side_by_side.UserError:
            pass
    assert commands[0][-1] == "--device=cpu" and commands[1][-2:] == ["--device=cpu", "--compile=False"]


def test_an_unknown_recipe_is_one_line():
    assert_user_error(run_script("logs/step_side_by_side.py", "--recipe=second"), "--recipe=second")


def test_zero_rounds_is_one_line_before_any_worktree():
    assert_user_error(run_script("logs/step_side_by_side.py", "--rounds=0"), "--rounds=0 must be at least 1")
