"""bench.py runs end to end on a model small enough for CI. What it measures is not checked here
(timing belongs to the benchmark); that it measures, reports and writes the README section is."""
import json

from conftest import assert_user_error, run_script

SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--warmup=1", "--iters=2"]


def test_a_training_case_worker_reports_its_numbers():
    result = run_script("bench.py", *SMALL, "--case=+ chunked head loss (our default)", "--device=cpu")
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["ms"] > 0 and numbers["tokens_per_s"] > 0 and numbers["peak_mb"] > 0 and 0 < numbers["mfu"] < 1


def test_sophia_and_sampling_sections_are_written_between_the_readme_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\noutro\n", encoding="utf-8")
    written = {}
    for section in ("sophia", "sample"):
        result = run_script("bench.py", *SMALL, f"--section={section}", "--sample_tokens=12", f"--readme={readme}")
        assert result.returncode == 0, result.stderr
        written[section] = readme.read_text(encoding="utf-8")
        assert written[section].startswith("intro\n<!-- bench:begin -->\n`python bench.py --n_layer=1")
        assert written[section].endswith("<!-- bench:end -->\noutro\n") and "old" not in written[section]
    assert "x AdamW): a step" in written["sophia"] and "the Hessian pass" in written["sophia"]
    assert "label sampling" in written["sophia"]
    assert "12 new tokens: without KV cache" in written["sample"] and "7 new tokens" in written["sample"]


def test_an_unknown_section_is_a_one_line_error():
    assert_user_error(run_script("bench.py", "--section=gpu"), "unknown --section=gpu")


def test_bench_times_the_model_that_train_builds_from_the_same_flags():
    import bench
    import train
    from opengpt.data import padded_vocab_size
    cfg = bench.DEFAULTS | dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=100, rotary=True,
                                activation="relu2", scale_attn_by_inverse_layer_idx=True, bias=False)
    model, _ = bench.build(cfg, "cpu")
    assert vars(model.config) == train.model_args_from(cfg, padded_vocab_size(100))
    assert model.config.scale_attn_by_inverse_layer_idx and model.config.rotary and model.config.vocab_size == 128
