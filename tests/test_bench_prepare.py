"""logs/bench_prepare.py: its mistakes are one line before any corpus is written, and Ctrl-C takes its
prepare.py run down with it. Timing prepare.py itself belongs to the benchmark, not here."""
import subprocess

import pytest

from conftest import assert_user_error, run_script
from logs import bench_prepare


@pytest.mark.parametrize("args, words", [(["--size_mb=-1"], "--size_mb=-1 must be above 0"),
                                         (["--size_mb=0"], "--size_mb=0 must be above 0"),
                                         (["--work_dir=FILE/x"], "cannot make --work_dir=")])
def test_mistakes_are_one_line_before_any_corpus_is_written(tmp_path, args, words):
    (tmp_path / "file").write_text("", encoding="utf-8")
    args = [a.replace("FILE", str(tmp_path / "file")) for a in args]
    assert_user_error(run_script("logs/bench_prepare.py", "--size_mb=1", f"--work_dir={tmp_path / 'work'}", *args), words)


def test_ctrl_c_while_prepare_runs_stops_prepare_too(tmp_path, monkeypatch):
    sleeper = tmp_path / "prepare.py"
    sleeper.write_text("import time\ntime.sleep(60)\n", encoding="utf-8")
    started, real_popen = [], subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_prepare, "PREPARE", str(sleeper))
    monkeypatch.setattr(bench_prepare.subprocess, "Popen", popen)
    monkeypatch.setattr(bench_prepare.time, "sleep", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            bench_prepare.run_prepare([])
        assert started[0].returncode is not None  # ended and waited for, not left running
    finally:
        if started[0].poll() is None:  # the test's own sleeper, had the script left it
            started[0].kill()
            started[0].wait()
