"""gpu_check.py's dry run goes through every part of the GPU check on the CPU with a tiny model
(what it measures here means nothing; that every part runs, reports and is written out does)."""
import re
import signal
import sys

import gpu_check
from conftest import assert_user_error, run_script


def test_the_dry_run_reports_every_part_and_writes_what_it_printed(tiny_data, tmp_path):
    report = tmp_path / "logs" / "gpu_check.txt"
    result = run_script("gpu_check.py", "--dry_run=True", f"--data_dir={tiny_data}", f"--out={report}",
                        f"--zh_out_dir={tmp_path / 'zh'}", "--zh_seconds=3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert report.read_text(encoding="utf-8") == result.stdout
    results = [line for line in result.stdout.splitlines() if line.startswith("RESULT:")]
    assert len(results) == 4, result.stdout
    assert "ms/step" in results[0] and "MFU" in results[0]
    assert "per iteration against AdamW" in results[1]
    assert "4 steps (finished)" in results[2] and "bits/char) @4" in results[2]
    assert re.fullmatch(r"RESULT: the same tokens on every path; tokens/s without KV cache [\d,]+, decode.py step [\d,]+",
                        results[3])
    assert (tmp_path / "zh" / "ckpt.pt").exists()


def test_a_part_past_its_time_limit_is_stopped_with_the_signal_given(tmp_path):
    """How the Chinese recipe is stopped should it overrun: SIGTERM, once stop_when agrees."""
    report = gpu_check.Report(str(tmp_path / "report.txt"))
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    status, stopped, lines = gpu_check.run_part(report, command, 1, stop_signal=signal.SIGTERM)
    assert stopped and status == -signal.SIGTERM and lines == ["started"]
    assert report.lines[-1] == "started"


def test_without_a_gpu_it_says_to_use_the_dry_run():
    assert_user_error(run_script("gpu_check.py"), "measures a CUDA GPU", "--dry_run=True")
