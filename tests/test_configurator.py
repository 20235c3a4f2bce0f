import importlib
import os
import re
import sys

import pytest

from conftest import assert_user_error, run_script
from configurator import ConfigError, parse_args

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, compile=False, device="auto", betas=(0.9, 0.95), wandb_run_name="run")


def test_overrides_are_parsed_as_literals_and_bare_words_as_strings():
    cfg = parse_args(DEFAULTS, ["--batch_size=8", "--learning_rate=1", "--compile=True", "--device=cuda:1",
                                "--betas=(0.8,0.99)", "--wandb_run_name=2024"])
    assert cfg == dict(batch_size=8, learning_rate=1.0, compile=True, device="cuda:1", betas=(0.8, 0.99), wandb_run_name="2024")
    assert isinstance(cfg["learning_rate"], float)


def test_config_file_then_overrides_in_order(tmp_path):
    config_file = tmp_path / "c.py"
    config_file.write_text("import math\nbatch_size = 4 * 3 * 2\n_scratch = 1\ndevice = 'cpu'\n")
    cfg = parse_args(DEFAULTS, [str(config_file), "--device=mps"])
    assert cfg["batch_size"] == 24 and cfg["device"] == "mps"


def test_unknown_key_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown option --batchsize \(did you mean batch_size\?\)"):
        parse_args(DEFAULTS, ["--batchsize=4"])


def test_wrong_type_names_the_key_and_the_expected_type():
    with pytest.raises(ConfigError, match="batch_size expects int, got 'four'"):
        parse_args(DEFAULTS, ["--batch_size=four"])
    with pytest.raises(ConfigError, match="compile expects bool"):
        parse_args(DEFAULTS, ["--compile=1"])


def test_config_file_mistakes_are_reported(tmp_path):
    bad_key = tmp_path / "bad_key.py"
    bad_key.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError, match="unknown key learning_rat .*learning_rate"):
        parse_args(DEFAULTS, [str(bad_key)])
    broken = tmp_path / "broken.py"
    broken.write_text("batch_size = = 3\n")
    with pytest.raises(ConfigError, match="SyntaxError"):
        parse_args(DEFAULTS, [str(broken)])
    with pytest.raises(ConfigError, match="not found"):
        parse_args(DEFAULTS, [str(tmp_path / "missing.py")])


def test_flag_without_value_is_an_error():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_args(DEFAULTS, ["--compile"])


def test_config_file_that_is_not_utf8_is_reported(tmp_path):
    config_file = tmp_path / "gbk.py"
    config_file.write_bytes("device = 'cpu'  # 设备\n".encode("gbk"))
    with pytest.raises(ConfigError, match=r"gbk.py is not UTF-8 text \(bad byte at offset 18\); save it as UTF-8"):
        parse_args(DEFAULTS, [str(config_file)])


def test_none_is_refused_where_the_default_is_not_none(tmp_path):
    with pytest.raises(ConfigError, match=r"^--batch_size expects int, got None"):
        parse_args(DEFAULTS, ["--batch_size=None"])
    with pytest.raises(ConfigError, match=r"^--learning_rate expects float, got None"):
        parse_args(DEFAULTS, ["--learning_rate=None"])
    config_file = tmp_path / "c.py"
    config_file.write_text("compile = None\n")
    with pytest.raises(ConfigError, match=r"compile in config file .*c.py expects bool, got None"):
        parse_args(DEFAULTS, [str(config_file)])


def test_none_stays_allowed_where_the_default_is_none(tmp_path):
    config_file = tmp_path / "c.py"
    config_file.write_text("limit = None\n")
    assert parse_args(dict(limit=None), ["--limit=None"])["limit"] is None
    assert parse_args(dict(limit=None), ["--limit=3", str(config_file)])["limit"] is None


def test_nan_is_refused_for_every_float_option(tmp_path):
    config_file = tmp_path / "c.py"
    config_file.write_text("learning_rate = float('nan')\n")
    with pytest.raises(ConfigError, match=r"learning_rate in config file .*c.py expects a number, got NaN"):
        parse_args(DEFAULTS, [str(config_file)])
    config_file.write_text("betas = (0.9, float('nan'))\n")
    with pytest.raises(ConfigError, match=r"betas in config file .*c.py expects a number, got NaN"):
        parse_args(DEFAULTS, [str(config_file)])
    # infinity is a number: whether an option may be infinite is its script's check
    assert parse_args(DEFAULTS, ["--learning_rate=1e999"])["learning_rate"] == float("inf")


# A script's DEFAULTS as the scripts write them: comment lines group options, a comment beside an
# option says what it is, and one script's DEFAULTS may extend another's (bench.py: train.DEFAULTS | dict(...)).
BASE_SCRIPT = '''
DEFAULTS = dict(
    # output
    out_dir="out",  # where checkpoints go
    # model
    n_layer=12,
    device="auto",  # auto | cpu | cuda
)
'''
SCRIPT = '''"""A script for the test: it trains nothing.

    python help_script.py --steps=3
"""
import help_base
from configurator import parse_args

DEFAULTS = help_base.DEFAULTS | dict(
    # its own, over the base's
    steps=10,  # how many steps
    # a header of
    # two lines
    name="", rate=0.5,  # the rate's comment
    device="cpu",
)


def main(argv):
    return parse_args(DEFAULTS, argv)
'''


@pytest.fixture
def help_script(tmp_path, monkeypatch):
    (tmp_path / "help_base.py").write_text(BASE_SCRIPT)
    (tmp_path / "help_script.py").write_text(SCRIPT)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("help_base", "help_script"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return importlib.import_module("help_script")


def help_of(script, capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        script.main(list(argv))
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_prints_every_option_with_its_default_and_comment_under_its_section(help_script, capsys):
    lines = help_of(help_script, capsys, "--help").splitlines()
    assert lines[0].startswith("usage: ") and lines[0].endswith("[CONFIG_FILE ...] [--KEY=VALUE ...]")
    options = [line.split()[0] for line in lines if line.startswith("  --")]
    # the base's options in its order, a key set again listed where it was set again, each option once
    assert options == ["--out_dir=out", "--n_layer=12", "--steps=10", "--name=''", "--rate=0.5", "--device=cpu"]
    assert re.search(r"^  # output\n  --out_dir=out +where checkpoints go$", "\n".join(lines), re.M)
    assert re.search(r"^  # model\n  --n_layer=12$", "\n".join(lines), re.M)
    assert re.search(r"^  # its own, over the base's\n  --steps=10 +how many steps$", "\n".join(lines), re.M)
    assert re.search(r"^  # a header of\n  # two lines\n  --name=''\n  --rate=0.5 +the rate's comment$", "\n".join(lines), re.M)
    # a value set again without a comment keeps the base's comment
    assert re.search(r"^  --device=cpu +auto \| cpu \| cuda$", "\n".join(lines), re.M)


def test_help_runs_nothing_else_and_h_is_the_same(help_script, capsys):
    text = help_of(help_script, capsys, "--steps=3", "missing_config.py", "--help", "--no_such_option=1")
    assert "--steps=10 " in text  # the defaults, not what the other arguments would have set
    assert help_of(help_script, capsys, "-h") == text


def test_help_without_a_defaults_source_still_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        parse_args(dict(alpha=1, beta=""), ["--help"])  # no module up the stack has these keys as DEFAULTS
    out = capsys.readouterr().out
    assert "  --alpha=1\n  --beta=''" in out


# A numeric (or bool) option of every script set to None: one line naming it and its type, exit 2.
NONE_OPTIONS = [
    ("train.py", "max_iters", "int"), ("train_adam.py", "learning_rate", "float"), ("train_sophiag.py", "rho", "float"),
    ("prepare.py", "val_fraction", "float"), ("sample.py", "num_samples", "int"), ("export.py", "overwrite", "bool"),
    ("bench.py", "iters", "int"), ("gpu_check.py", "zh_seconds", "int"), ("logs/speedrun.py", "minutes", "float"),
    ("logs/compare_optimizers.py", "workers", "int"), ("logs/bench_prepare.py", "size_mb", "int"),
    ("logs/step_side_by_side.py", "rounds", "int"),
]


@pytest.mark.parametrize("script, key, type_name", NONE_OPTIONS, ids=[s[0] for s in NONE_OPTIONS])
def test_every_script_refuses_none_for_an_option_whose_default_is_not_none(script, key, type_name, tmp_path):
    result = run_script(script, f"--{key}=None", cwd=tmp_path, timeout=120)
    assert_user_error(result, f"--{key} expects {type_name}, got None")
    assert os.listdir(tmp_path) == []


def test_a_nan_learning_rate_in_a_config_file_is_refused(tmp_path):
    config_file = tmp_path / "nan.py"
    config_file.write_text("learning_rate = float('nan')\n")
    result = run_script("train.py", config_file, "--device=cpu", f"--out_dir={tmp_path / 'out'}", cwd=tmp_path, timeout=120)
    assert_user_error(result, "learning_rate in config file", "expects a number, got NaN")
    assert os.listdir(tmp_path) == ["nan.py"]


def test_a_folder_given_as_a_config_file_is_named_as_one(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; name a .py file"):
        parse_args({"batch_size": 1}, [str(tmp_path)])


def test_an_option_that_is_not_utf8_is_a_config_error():
    """A byte the locale cannot decode reaches sys.argv as a lone surrogate, which no tokenizer takes."""
    with pytest.raises(ConfigError, match="--start is not UTF-8 text"):
        parse_args({"start": "\n"}, ["--start=ab\udcffc"])
    assert parse_args({"start": "\n"}, ["--start=滚滚长江"]) == {"start": "滚滚长江"}
