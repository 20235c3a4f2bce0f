import os
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "logs"))
import compare_optimizers as compare  # noqa: E402
from plot_loss import Curve  # noqa: E402


def test_method_names_are_the_labels_the_registry_gives_their_runs():
    """The table's rows, the plot's lines and logs/plot_loss.py's groups name a run the same way."""
    import train
    from configurator import parse_args
    from optimizers import REGISTRY

    for method, spec in compare.METHODS.items():
        config = parse_args(train.DEFAULTS, spec["args"])
        assert REGISTRY[config["optimizer"]].run_label(config) == method
    assert len({compare.slug(m) for m in compare.METHODS}) == len(compare.METHODS)  # one folder name each


def test_steps_to_reach_interpolates_between_evaluations():
    curve = Curve(np.array([0, 250, 500, 750]), np.array([10.0, 4.0, 3.0, 2.5]), None)
    assert compare.steps_to_reach(curve, 3.5) == 375
    assert compare.steps_to_reach(curve, 3.0) == 500
    assert compare.steps_to_reach(curve, 2.0) is None


def test_relative_gain_uses_the_older_tables_sign():
    # the older table: AdamW 2.8763, "Sophia" 2.7042 -> "+5.98%"
    assert compare.relative_gain(2.8763, 2.7042) == "+5.98%"
    assert compare.relative_gain(2.0, 2.1) == "-5.00%"


def test_sweep_extends_a_grid_whose_best_rate_is_at_an_edge(monkeypatch):
    """Loss as a function of lr with its minimum at 8e-3 for every method: the grids must grow
    upwards until the best value is inside, within max_extensions."""
    trained = []
    monkeypatch.setattr(compare, "train_all", lambda cfg, jobs: trained.extend(jobs))
    monkeypatch.setattr(compare, "final_val_loss", lambda cfg, method, lr, seed: abs(np.log2(lr / 8e-3)))
    cfg = dict(compare.DEFAULTS, max_extensions=3)
    grids, chosen = compare.sweep(cfg)
    assert grids["AdamW"] == [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    assert chosen["AdamW"] == 8e-3
    assert all(seed == cfg["sweep_seed"] for _, _, seed in trained)
    # SophiaG's grid starts at 2.5e-4 and may only grow three times: the best stays at its edge
    assert grids["SophiaG (k=10)"] == [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3] and chosen["SophiaG (k=10)"] == 8e-3


def test_the_sweep_seed_may_not_be_a_final_seed(monkeypatch):
    import cli

    monkeypatch.setattr(sys, "argv", ["compare_optimizers.py", "--sweep_seed=1", "--seeds=(1,2,3)"])
    with pytest.raises(cli.UserError, match="sweep_seed=1 is one of --seeds"):
        compare.main()
