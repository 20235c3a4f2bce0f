"""bench.py runs end to end on a model small enough for CI. What it measures is not checked here
(timing belongs to the benchmark); that it measures, reports and writes its report file is."""
import json

import pytest

from conftest import assert_user_error, run_script

SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--warmup=1", "--iters=2"]


def test_a_training_case_worker_reports_its_numbers():
    result = run_script("bench.py", *SMALL, "--case=+ chunked head loss (our default)", "--device=cpu")
    assert result.returncode == 0, result.stderr
    numbers = json.loads(result.stdout.strip().splitlines()[-1])
    assert numbers["ms"] > 0 and numbers["tokens_per_s"] > 0 and numbers["peak_mb"] > 0 and 0 < numbers["mfu"] < 1


def test_sophia_and_sampling_sections_are_written_whole_to_the_report_file_with_the_command(tmp_path):
    report = tmp_path / "bench.md"
    report.write_text("`python bench.py --section=train` on an older machine:\n", encoding="utf-8")  # an earlier report
    written = {}
    for section in ("sophia", "sample"):
        result = run_script("bench.py", *SMALL, f"--section={section}", "--sample_tokens=12", f"--out={report}")
        assert result.returncode == 0, result.stderr
        written[section] = report.read_text(encoding="utf-8")
        command = " ".join(["python bench.py", *SMALL, f"--section={section}", "--sample_tokens=12"])
        assert written[section].startswith(f"`{command}` on ") and "older machine" not in written[section]
        assert written[section].endswith("\n```\n") and written[section].count("```") == 2
        assert written[section].split("```\n")[1].rstrip("\n") in result.stdout  # the report printed is the report written
    assert [p.name for p in tmp_path.iterdir()] == ["bench.md"]  # no temp file left
    for hessian_batch in ("--hessian_batch=fresh (the authors'): a step", "--hessian_batch=step: a step"):
        assert "x AdamW) " + hessian_batch in written["sophia"]
    assert "label sampling" in written["sophia"]
    assert "12 new tokens: without KV cache" in written["sample"] and "7 new tokens" in written["sample"]


def test_the_step_section_reports_the_step_against_its_own_matrix_products():
    result = run_script("bench.py", *SMALL, "--section=step", "--optimizer=muon")
    assert result.returncode == 0, result.stderr
    assert "step / matrix products" in result.stdout and "ns per logit element" in result.stdout
    assert "muon" in result.stdout and "head " in result.stdout and "optimizer " in result.stdout
    assert "top ops by own time" in result.stdout and "aten::mm" in result.stdout  # the step's profile


def test_the_recorded_matrix_products_are_the_steps_by_part():
    import bench
    from configurator import parse_args
    cfg = parse_args(bench.DEFAULTS, [*SMALL, "--optimizer=muon", "--dropout=0.0", "--bias=False"])
    t = bench.build_training(cfg, "cpu", "muon", "float32")
    calls = bench.record_gemms(t)
    parts = [part for part, *_ in calls]
    # one layer: 4 Linears x (forward, grad of input, grad of weight); the head loss: 3 products; attention: SDPA's forward and backward
    assert parts.count("body") == 12 and parts.count("head") == 3 and parts.count("attention") == 2
    # Muon: 3 products per Newton-Schulz iteration, one stack per shape of its matrices
    assert parts.count("optimizer") % 15 == 0 and parts.count("optimizer") > 0
    bench.replayer(calls)()  # runs again on inputs of the recorded shapes


def test_the_recorded_ops_are_torchs_own_names():
    """The GPU's attention kernels cannot run here: their names at least are the ones torch dispatches."""
    import torch
    import bench
    for name in bench.GEMM_OPS:
        assert getattr(torch.ops.aten, name.removeprefix("aten::")).default._schema.name == name


def test_an_unknown_section_is_a_one_line_error():
    assert_user_error(run_script("bench.py", "--section=gpu"), "unknown --section=gpu")


def test_a_report_file_in_a_missing_folder_is_a_one_line_error_before_any_measuring(tmp_path):
    assert_user_error(run_script("bench.py", f"--out={tmp_path / 'missing' / 'bench.md'}"), "--out=", "folder does not exist")


def test_bench_times_the_model_that_train_builds_from_the_same_flags():
    import bench
    from opengpt.data import padded_vocab_size
    from opengpt.run_setup import model_args_from
    cfg = bench.DEFAULTS | dict(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=100, rotary=True,
                                activation="relu2", scale_attn_by_inverse_layer_idx=True, bias=False)
    model, _ = bench.build(cfg, "cpu")
    assert vars(model.config) == model_args_from(cfg, padded_vocab_size(100))
    assert model.config.scale_attn_by_inverse_layer_idx and model.config.rotary and model.config.vocab_size == 128


def test_a_config_that_asks_for_dtype_auto_or_a_dtype_bench_lacks_is_resolved_before_any_section():
    """config/train_zh_speedrun.py sets dtype="auto": the sophia section once met it after minutes of the train section."""
    result = run_script("bench.py", "config/train_zh_speedrun.py", *SMALL, "--section=sophia", "--vocab_size=256",
                        "--compile=False", "--iters=1", "--n_layer=1")
    assert result.returncode == 0, result.stderr
    assert_user_error(run_script("bench.py", *SMALL, "--dtype=int8"), "unknown --dtype=int8")


@pytest.mark.parametrize("flag", ["--iters=0", "--iters=-1", "--repeats=0"])
def test_zero_or_negative_counts_are_one_line_errors(flag):
    assert_user_error(run_script("bench.py", *SMALL, flag), flag, "at least 1")


def test_an_out_that_cannot_take_the_report_or_holds_another_file_is_refused_before_any_measuring(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# a project\n", encoding="utf-8")
    quick = [*SMALL, "--section=sample", "--sample_tokens=4"]
    for out, words in ((tmp_path, "is a folder"), ("/proc/x.md", "--out=/proc/x.md: cannot write in /proc"),
                       (readme, "something other than a bench.py report")):
        result = run_script("bench.py", *quick, f"--out={out}")
        assert_user_error(result, words)
        assert result.stdout == ""  # refused before any measuring
    assert readme.read_text(encoding="utf-8") == "# a project\n"
