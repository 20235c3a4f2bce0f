import pytest

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
