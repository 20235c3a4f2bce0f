"""Every config file loads into train.py's options, and its tokens-per-step comment is its arithmetic."""
import glob
import os
import re

import pytest

from opengpt import optimizers
import train
from configurator import parse_args
from opengpt.run_setup import check_config
from conftest import REPO

CONFIGS = sorted(glob.glob(os.path.join(REPO, "config", "*.py")))
ARITHMETIC = re.compile(r"#.*?(\d+) batch(?: size)? \* (\d+) block(?: size)? \* (\d+) accumulation(?: \* (\d+) GPUs)? = ([\d,]+)")


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_is_valid(path):
    cfg = parse_args(train.DEFAULTS, [path])
    check_config(cfg)
    assert cfg["optimizer"] in optimizers.REGISTRY


@pytest.mark.parametrize("path", [p for p in CONFIGS if "tiny_zh.py" in p or "gpt2" in p or "cpu" in p or "speedrun" in p], ids=os.path.basename)
def test_tokens_per_step_comment_matches_the_settings(path):
    cfg = parse_args(train.DEFAULTS, [path])
    with open(path, encoding="utf-8") as f:
        match = ARITHMETIC.search(f.read())
    assert match, "the config shows its tokens-per-step arithmetic"
    batch, block, accumulation, gpus, total = match.groups()
    assert (int(batch), int(block), int(accumulation)) == (cfg["batch_size"], cfg["block_size"], cfg["gradient_accumulation_steps"])
    assert int(batch) * int(block) * int(accumulation) * int(gpus or 1) == int(total.replace(",", ""))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_a_config_is_short_and_pins_the_cpu_only_where_its_name_says_so(path):
    with open(path, encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 50, "tuning histories and measurements belong in logs/README.md"
    # a pinned CPU would, under torchrun on a GPU machine, quietly train on CPU processes
    assert parse_args(train.DEFAULTS, [path])["device"] != "cpu" or "cpu" in os.path.basename(path)


def test_a_time_budget_is_not_refused_for_a_decay_it_replaces():
    """--max_minutes decides the decay's length itself: a config's shorter lr_decay_iters does not matter."""
    cfg = parse_args(train.DEFAULTS, ["--warmup_iters=12", "--lr_decay_iters=5"])
    with pytest.raises(Exception, match="must exceed --warmup_iters"):
        check_config(cfg)
    check_config(cfg | {"max_minutes": 0.5})
