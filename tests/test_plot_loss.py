import json
import os

import numpy as np
import pytest

from conftest import assert_user_error, run_script
from logs import plot_loss


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(folder, optimizer="adamw", seed=1, losses=(10.0, 9.0, 8.0), hess_interval=10, learning_rate=1e-3,
                  start=1000.0, machine=None):
    """A run folder's metrics.jsonl as train.py writes it: a config event, half a second later an
    eval at step 0, then train events at steps 0, 10, 20, ... one second apart, and an eval at the
    last step half a second after its train event."""
    os.makedirs(folder, exist_ok=True)
    config = dict(optimizer=optimizer, seed=seed, hess_interval=hess_interval, learning_rate=learning_rate,
                  out_dir=str(folder))
    events = [{"event": "config", "time": start - 0.5, "config": config, **({"machine": machine} if machine else {})},
              {"event": "eval", "time": start, "iter": 0, "train_loss": 11.0, "val_loss": 11.0, "lr": 0.0}]
    for i, loss in enumerate(losses):
        events.append({"event": "train", "time": start + i + 1, "iter": 10 * i, "loss": loss, "lr": 1e-3,
                       "time_ms": 1000.0, "tokens_per_sec": 768.0, "mfu": 0.1})
    last = 10 * (len(losses) - 1)
    events.append({"event": "eval", "time": start + len(losses) + 0.5, "iter": last, "train_loss": losses[-1],
                   "val_loss": losses[-1] + 0.25, "lr": 1e-4})
    path = os.path.join(folder, "metrics.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)
    return path


TEXT_LOG = """\
tokens per optimizer step: 768 = 12 batch x 64 block x 1 accumulation x 1 processes
step 0: train loss 10.8610, val loss 10.8522
iter 0: loss 10.8587, time 5025.85ms, mfu 25.80%
iter 5: non-finite loss or gradient, step skipped (1 in a row)
iter 10: loss 9.1943, time 1990.36ms, mfu 4.92%, win_rate 0.001
step 10: train loss 9.0951, val loss 9.1164
saved checkpoint to out/ckpt.pt
iter 20: loss 8.4501, time 2976.39ms, mfu 43.57%
"""


def test_parse_metrics_jsonl_reads_losses_and_seconds_from_the_loop_start(tmp_path):
    run = plot_loss.parse_metrics_jsonl(write_metrics(tmp_path / "run", optimizer="sophiag", losses=(10.5, 9.0)))
    assert run.config["optimizer"] == "sophiag" and run.config["hess_interval"] == 10
    assert run.train.steps.tolist() == [0, 10]
    assert run.train.loss.tolist() == [10.5, 9.0]
    # the clock starts at the config event (time 999.5)
    assert run.train.seconds.tolist() == [1.5, 2.5]
    assert run.val.steps.tolist() == [0, 10]
    assert run.val.loss.tolist() == [11.0, 9.25]
    assert run.val.seconds.tolist() == [0.5, 3.0]


def test_parse_metrics_jsonl_joins_a_resumed_run_without_its_downtime(tmp_path):
    path = write_metrics(tmp_path / "run", losses=(10.0, 9.0, 8.0))
    # killed after step 20, resumed from the step-10 checkpoint an hour later: steps 10.. are redone
    resumed = [{"event": "config", "time": 4600.0, "config": {"optimizer": "adamw", "seed": 1}},
               {"event": "train", "time": 4601.0, "iter": 10, "loss": 8.5},
               {"event": "train", "time": 4602.0, "iter": 20, "loss": 7.5}]
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in resumed)
    run = plot_loss.parse_metrics_jsonl(path)
    assert run.train.steps.tolist() == [0, 10, 20]
    assert run.train.loss.tolist() == [10.0, 8.5, 7.5]
    # the kept records end at 1.5 s (step 0); the resumed process's clock continues from there
    assert run.train.seconds.tolist() == [1.5, 2.5, 3.5]
    assert run.val.steps.tolist() == [0]  # the first attempt's step-20 eval was after the checkpoint


def test_parse_text_log_reads_iter_and_step_lines_and_skips_the_rest(tmp_path):
    path = tmp_path / "sophia.log"
    path.write_text(TEXT_LOG, encoding="utf-8")
    run = plot_loss.parse_text_log(str(path))
    assert run.train.steps.tolist() == [0, 10, 20]
    assert run.train.loss.tolist() == [10.8587, 9.1943, 8.4501]
    assert run.val.steps.tolist() == [0, 10]
    assert run.val.loss.tolist() == [10.8522, 9.1164]
    assert run.train.seconds is None and run.val.seconds is None  # a text log has no clock
    assert run.config == {}


def test_runs_group_by_optimizer_and_hess_interval_else_by_file_name(tmp_path):
    runs = [plot_loss.parse_metrics_jsonl(write_metrics(tmp_path / name, optimizer=opt, seed=seed, hess_interval=k))
            for name, opt, seed, k in [("a1", "adamw", 1, 10), ("s1", "sophiag", 1, 10), ("a2", "adamw", 2, 10),
                                       ("z1", "sophiag", 1, 0)]]
    (tmp_path / "nanogpt_baseline.log").write_text(TEXT_LOG, encoding="utf-8")
    text_run = plot_loss.parse_text_log(str(tmp_path / "nanogpt_baseline.log"))
    groups = plot_loss.group_runs([(None, run) for run in runs] + [(None, text_run), ("Mine", runs[0])])
    assert list(groups) == ["AdamW", "SophiaG (k=10)", "SophiaG (k=0, sign momentum)", "nanogpt_baseline", "Mine"]
    assert [run.config["seed"] for run in groups["AdamW"]] == [1, 2]


def test_band_is_mean_min_and_max_over_seeds_at_the_common_steps(tmp_path):
    curves = [plot_loss.parse_metrics_jsonl(write_metrics(tmp_path / f"s{seed}", seed=seed, losses=losses)).train
              for seed, losses in [(1, (10.0, 9.0, 8.0)), (2, (10.0, 8.0, 7.0)), (3, (10.0, 7.0))]]
    band = plot_loss.band(curves)
    assert band.steps.tolist() == [0, 10]  # seed 3 stopped at step 10
    np.testing.assert_allclose(band.mean, [10.0, 8.0])
    np.testing.assert_allclose(band.low, [10.0, 7.0])
    np.testing.assert_allclose(band.high, [10.0, 9.0])
    np.testing.assert_allclose(band.seconds, [1.5, 2.5])
    assert band.runs == 3


def test_a_group_mixing_learning_rates_gets_a_note(tmp_path):
    runs = [plot_loss.parse_metrics_jsonl(write_metrics(tmp_path / f"s{seed}", seed=seed, learning_rate=lr))
            for seed, lr in [(1, 1e-3), (2, 3e-4)]]
    assert plot_loss.config_differences(runs) == ["learning_rate"]
    assert any("learning_rate" in note for note in plot_loss.group_notes("AdamW", runs))
    same = [plot_loss.parse_metrics_jsonl(write_metrics(tmp_path / f"t{seed}", seed=seed)) for seed in (1, 2)]
    assert list(plot_loss.group_notes("AdamW", same)) == []


def test_the_clock_axis_names_the_machine_only_when_the_logs_record_it(tmp_path):
    h100 = plot_loss.parse_metrics_jsonl(write_metrics(tmp_path / "a", machine="NVIDIA H100 80GB HBM3"))
    unknown = plot_loss.parse_metrics_jsonl(write_metrics(tmp_path / "b"))
    assert plot_loss.clock_label([h100]) == "wall-clock seconds on NVIDIA H100 80GB HBM3"
    assert plot_loss.clock_label([unknown]) == "wall-clock seconds (machine not recorded)"
    assert "different machines" in plot_loss.clock_label([h100, unknown])


def test_cli_writes_a_png_of_seeds_and_a_text_log(tmp_path):
    folders = []
    for seed, optimizer in [(1, "adamw"), (2, "adamw"), (1, "sophiag"), (2, "sophiag")]:
        losses = (10.0, 9.0 - seed * 0.1, 8.0 - seed * 0.2)
        write_metrics(tmp_path / f"{optimizer}-{seed}", optimizer=optimizer, seed=seed, losses=losses)
        folders.append(tmp_path / f"{optimizer}-{seed}")
    text_log = tmp_path / "nanogpt.log"
    text_log.write_text(TEXT_LOG, encoding="utf-8")
    out = tmp_path / "plots" / "loss.png"
    result = run_script("logs/plot_loss.py", *folders, text_log, f"--label={text_log}=nanoGPT AdamW", f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert "AdamW (2 runs)" in result.stdout and "SophiaG (k=10) (2 runs)" in result.stdout
    assert "nanoGPT AdamW (1 run)" in result.stdout
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1560, 1080)  # 13 x 9 inches at 120 dpi
    assert len(data) > 30_000, "a four-panel plot with curves, not an empty canvas"


@pytest.mark.parametrize("case", ["missing", "no_loss_lines", "folder_without_metrics", "bad_json", "bad_label"])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, case):
    out = f"--out={tmp_path / 'loss.png'}"
    if case == "missing":
        result, words = run_script("logs/plot_loss.py", tmp_path / "nope.log", out), ("nope.log", "not found")
    elif case == "no_loss_lines":
        empty = tmp_path / "empty.log"
        empty.write_text("tokens per optimizer step: 768\nsaved checkpoint\n", encoding="utf-8")
        result, words = run_script("logs/plot_loss.py", empty, out), ("empty.log", "no loss lines")
    elif case == "folder_without_metrics":
        (tmp_path / "run").mkdir()
        result, words = run_script("logs/plot_loss.py", tmp_path / "run", out), ("no metrics.jsonl",)
    elif case == "bad_json":
        path = write_metrics(tmp_path / "run")
        with open(path, "a", encoding="utf-8") as f:
            f.write('{"event": "train", "iter": \n')  # line 7: a line cut short
        result, words = run_script("logs/plot_loss.py", path, out), ("metrics.jsonl:7", "not valid JSON")
    else:
        path = write_metrics(tmp_path / "run")
        result, words = run_script("logs/plot_loss.py", path, "--label=AdamW", out), ("--label=AdamW", "RUN=NAME")
    assert_user_error(result, *words)
    assert not (tmp_path / "loss.png").exists()


def test_bits_per_character_on_the_y_axis(tmp_path):
    path = write_metrics(tmp_path / "run")
    with open(path, encoding="utf-8") as f:
        events = [json.loads(line) for line in f]
    for number, event in enumerate(e for e in events if e["event"] == "eval"):
        event.update(train_bpc=7.0 - number, val_bpc=7.5 - number)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)
    run = plot_loss.parse_metrics_jsonl(path, y="bpc")
    assert run.val.steps.tolist() == [0, 20] and run.val.loss.tolist() == [7.5, 6.5]
    assert run.train.steps.tolist() == [0, 20] and run.train.loss.tolist() == [7.0, 6.0]  # the evaluations' train split
    out = tmp_path / "bpc.png"
    result = run_script("logs/plot_loss.py", str(tmp_path / "run"), f"--out={out}", "--y=bpc")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(PNG_SIGNATURE)


def test_bits_per_character_of_an_older_log_is_one_line(tmp_path):
    write_metrics(tmp_path / "run")  # evaluations without val_bpc, as before bits per character
    assert_user_error(run_script("logs/plot_loss.py", str(tmp_path / "run"), f"--out={tmp_path / 'x.png'}", "--y=bpc"),
                      "no bits per character")


def test_an_out_that_is_a_folder_or_under_a_file_is_one_line(tmp_path):
    write_metrics(tmp_path / "run")
    (tmp_path / "file").write_text("", encoding="utf-8")
    (tmp_path / "folder").mkdir()
    for out in (tmp_path / "file" / "x.png", tmp_path / "folder"):
        assert_user_error(run_script("logs/plot_loss.py", str(tmp_path / "run"), f"--out={out}"), f"cannot write --out={out}")
    assert os.listdir(tmp_path / "folder") == []
