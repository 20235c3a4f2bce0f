"""weight_average.py against the moving average written out by hand, and train.py's use of it: what
it evaluates and saves, and an exact resume."""
import torch

from opengpt import checkpoint as ckpt
from conftest import read_events, run_script
from test_train import train_args, train_ok
from opengpt.weight_average import WeightAverage


def test_the_average_follows_the_formula_with_its_short_memory_at_first():
    model = torch.nn.Linear(3, 2)
    decay = 0.6
    average = WeightAverage(model, decay)
    expected = [p.detach().clone() for p in model.parameters()]
    for n in range(1, 8):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update(model)
        d = min(decay, (1 + n) / (10 + n))  # 0.18, 0.27, ... then 0.6 from n = 5
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    for got, want in zip(average.params, expected):
        torch.testing.assert_close(got, want)


def test_the_model_holds_the_average_inside_swapped_in_and_its_own_weights_after():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, 0.9)
    own = [p.detach().clone() for p in model.parameters()]
    for a in average.params:
        a.add_(1.0)
    with average.swapped_in(model):
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), average.params))
    assert all(torch.equal(p, o) for p, o in zip(model.parameters(), own))
    state = average.averaged_state_dict(model)
    assert torch.equal(state["weight"], average.params[0]) and torch.equal(model.weight, own[0])


def test_train_evaluates_and_saves_the_average_and_resumes_exactly(tiny_data, tmp_path):
    common = ["--ema_decay=0.9", "--sampling=epochs", "--lr_decay_iters=8", "--eval_interval=4", "--learning_rate=1e-2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_ok(*train_args(tiny_data, straight, *common, "--max_iters=8"))
    train_ok(*train_args(tiny_data, resumed, *common, "--max_iters=4"))
    train_ok(*train_args(tiny_data, resumed, *common, "--max_iters=8", "--init_from=resume"))
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(resumed / "ckpt.pt", weights_only=True)
    for key in ("model", "trained_model"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert a["weight_average_updates"] == 8
    assert not torch.equal(a["model"]["lm_head.weight"], a["trained_model"]["lm_head.weight"])
    assert [e["loss"] for e in read_events(straight, "train")] == [e["loss"] for e in read_events(resumed, "train")]

    # the val loss logged at the end is the saved "model"'s, the average's
    import train
    from opengpt.data import TokenData
    from opengpt.training import evaluate
    model = ckpt.model_from(a)
    data = TokenData(str(tiny_data), 16)
    cfg = train.DEFAULTS | {"eval_iters": 2, "batch_size": 4}
    evaluated = evaluate(model, data, cfg, "cpu", torch.autocast("cpu", enabled=False), torch.ones(50304, dtype=torch.long))
    assert evaluated["val"]["loss"] == read_events(straight, "eval")[-1]["val_loss"]
    result = run_script("sample.py", f"--out_dir={straight}", "--device=cpu", "--num_samples=1", "--max_new_tokens=3",
                        "--start=a")
    assert result.returncode == 0, result.stderr
