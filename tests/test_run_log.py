import os
import sys
import types

import pytest

from opengpt.cli import UserError
from conftest import read_events
from opengpt.run_log import RunLog


def config(tmp_path, **overrides):
    return dict(out_dir=str(tmp_path), init_from="scratch", tensorboard_log=False, wandb_log=False,
                wandb_project="p", wandb_run_name="r") | overrides


def test_events_are_json_lines_with_the_config_first(tmp_path):
    log = RunLog(config(tmp_path), enabled=True, machine="test machine")
    log.event("train", iter=0, loss=3.5, lr=1e-3)
    log.close()
    events = read_events(tmp_path)
    assert events[0]["event"] == "config" and events[0]["machine"] == "test machine"
    assert events[1] == {"event": "train", "time": events[1]["time"], "iter": 0, "loss": 3.5, "lr": 1e-3}


def test_a_resumed_run_appends_to_its_log(tmp_path):
    RunLog(config(tmp_path), enabled=True).close()
    RunLog(config(tmp_path, init_from="resume"), enabled=True).close()
    assert [e["event"] for e in read_events(tmp_path)] == ["config", "config"]


def test_other_ranks_write_nothing(tmp_path):
    log = RunLog(config(tmp_path), enabled=False)
    log.event("train", iter=0, loss=1.0)
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_gets_the_same_scalars_as_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(config(tmp_path, tensorboard_log=True), enabled=True)
    for step, loss in enumerate([3.0, 2.5, 2.25]):
        log.event("train", iter=step, loss=loss, lr=0.1 * step)
    log.event("eval", iter=2, train_loss=2.2, val_loss=2.4)
    log.close()
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [(s.step, s.value) for s in accumulator.Scalars("train/loss")] == [(0, 3.0), (1, 2.5), (2, 2.25)]
    assert [(s.step, pytest.approx(s.value)) for s in accumulator.Scalars("eval/val_loss")] == [(2, 2.4)]
    assert "train/iter" not in accumulator.Tags()["scalars"]


def test_wandb_missing_is_a_message_not_a_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    log = RunLog(config(tmp_path, wandb_log=True), enabled=True)
    log.event("train", iter=0, loss=1.0)
    log.close()
    assert "wandb is not installed" in capsys.readouterr().err
    assert read_events(tmp_path)[-1]["loss"] == 1.0


def test_wandb_offline_is_a_message_not_a_failure(tmp_path, monkeypatch, capsys):
    def init(**kwargs):
        raise ConnectionError("no network")
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    log = RunLog(config(tmp_path, wandb_log=True), enabled=True)
    log.event("train", iter=0, loss=1.0)
    log.close()
    assert "wandb could not start (ConnectionError: no network); continuing without it" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, where every write fails as on a full disk")
def test_a_full_disk_stops_the_run_with_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # writes fail with ENOSPC, like a full filesystem
    with pytest.raises(UserError, match=r"could not write .*metrics.jsonl \(No space left on device, .* MB free there\)"):
        RunLog(config(tmp_path, init_from="resume"), enabled=True)


def test_a_line_the_disk_had_no_room_for_is_taken_back_and_a_resume_appends_whole_lines(tmp_path):
    log = RunLog(config(tmp_path), enabled=True)
    log.event("train", iter=0, loss=3.5)
    real = log.file

    class HalfWritten:  # as a filesystem that fills up part way through a line
        def write(self, text):
            real.write(text[:len(text) // 2])
            real.flush()
            raise OSError(28, "No space left on device")

        def close(self):
            real.close()
    log.file = HalfWritten()
    with pytest.raises(UserError, match="could not write"):
        log.event("train", iter=1, loss=3.25)
    assert [e["iter"] for e in read_events(tmp_path)[1:]] == [0]  # the half line is gone
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"event": "train", "iter": 2, "lo')  # and one a killed process left
    RunLog(config(tmp_path, init_from="resume"), enabled=True).close()
    assert [e["event"] for e in read_events(tmp_path)] == ["config", "train", "config"]
