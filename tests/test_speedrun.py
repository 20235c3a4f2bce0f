"""logs/speedrun.py: the nanoGPT way gets its best learning rate (the sweep grows past a winning
edge), and the tables report what the runs measured. Training is replaced by a fake here; the
runs themselves are ordinary train.py runs, tested in test_time_budget.py and test_train.py."""
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "logs"))
import speedrun  # noqa: E402


def fake_run(val_bpc, steps=100, lr=1e-3, vocab=8192, kind="bpe"):
    config = dict(n_layer=2, n_embd=128, block_size=64, batch_size=12, dtype="float32", learning_rate=lr)
    meta = dict(vocab_size=vocab, tokenizer=dict(kind=kind), splits=dict(val=dict(characters=1000, tokens=700)))
    return dict(config=config, meta=meta, steps=steps, dtype="float32", tokens=steps * 768, characters=steps * 1000.0, val_bpc=val_bpc,
                seconds=600.0, ms_per_step=50.0, parameters=1.5e6, machine="a test CPU", planned=True)


@pytest.fixture
def fake_training(monkeypatch):
    """budget_run replaced: the nanoGPT sweep's bits/char are a parabola in log2(lr), lowest at 8e-3."""
    import math
    calls = []

    def budget_run(cfg, name, config_file, args, minutes):
        calls.append((name, minutes))
        lr = next(float(a.split("=")[1]) for a in args if a.startswith("--learning_rate="))
        best = 8e-3 if name.startswith("nanogpt") else 3e-3
        bpc = (8.0 if name.startswith("nanogpt") else 5.0) + (math.log2(lr / best)) ** 2 / 10
        return fake_run(bpc, lr=lr, kind="gpt2" if name.startswith("nanogpt") else "bpe")

    monkeypatch.setattr(speedrun, "budget_run", budget_run)
    monkeypatch.setattr(speedrun, "ensure_data", lambda flags, folder: {})
    return calls


def test_the_sweep_grows_past_a_winning_edge_then_trains_the_winner(fake_training):
    cfg = dict(speedrun.DEFAULTS)
    table = speedrun.speedrun_table(cfg)
    sweep = [name for name, minutes in fake_training if name.startswith("nanogpt") and minutes == cfg["sweep_minutes"]]
    assert sweep == [f"nanogpt_lr{lr}_2min" for lr in ("0.001", "0.002", "0.004", "0.008", "0.016")]
    assert ("nanogpt_lr0.008_10min", cfg["minutes"]) in fake_training
    recipe_lr = speedrun.recipe_learning_rate()  # (b)'s sweep is centred on its config's rate
    assert (f"recipe_zh_default_lr{3e-3:g}_10min", cfg["minutes"]) in fake_training
    assert sum(name.startswith("recipe") and minutes == cfg["sweep_minutes"] for name, minutes in fake_training) >= 3
    assert f"recipe_zh_default_lr{recipe_lr:g}_2min" in [name for name, _ in fake_training]
    assert "(b) / (a) = **0.62x**" in table  # 5.0 / 8.0
    assert "| (a) the nanoGPT way | GPT-2 BPE |" in table and "| (b) our default recipe | BPE 8,192 |" in table


def test_the_tokenizer_table_marks_the_lowest_bits_per_character(monkeypatch):
    results = iter([None, 5.9, 5.6, 5.7])

    def budget_run(cfg, name, config_file, args, minutes):
        bpc = next(results)
        if bpc is None:  # GPT-2's vocabulary: the head too slow for the budget
            raise speedrun.RunFailed(f"run {name} failed (exit 2): train.py: error: --max_minutes=2 leaves room for 12 steps")
        return fake_run(bpc)

    monkeypatch.setattr(speedrun, "budget_run", budget_run)
    monkeypatch.setattr(speedrun, "ensure_data", lambda flags, folder: {})
    table = speedrun.tokenizer_table(dict(speedrun.DEFAULTS))
    assert "**5.600**" in table and table.count("**") == 2 and "Best: BPE 8,192." in table
    assert "| GPT-2 BPE | | | | | | did not fit: --max_minutes=2 leaves room for 12 steps |" in table
