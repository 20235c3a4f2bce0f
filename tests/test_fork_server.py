"""The tests' fork server ends a script as a fresh `python SCRIPT` does: status, output, threads, atexit."""
import os
import subprocess
import sys

import pytest

from conftest import FORK_SERVER

SCRIPTS = {
    "plain": "print('out', end='')\n",  # no newline: still buffered when the script ends
    "status": "import sys\nprint('before')\nsys.exit(3)\n",
    "message": "import sys\nsys.exit('a message for stderr')\n",
    "traceback": "print('before')\nraise ValueError('boom')\n",
    "thread and atexit": ("import atexit, threading, time\n"
                          "atexit.register(print, 'atexit ran')\n"
                          "threading.Thread(target=lambda: (time.sleep(0.2), print('thread finished'))).start()\n"),
    "argv and stdin": "import sys\nprint(sys.argv[1:], sys.stdin.read() == '')\n",
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_forked_script_ends_as_a_fresh_interpreter_does(tmp_path, name):
    script = tmp_path / "script.py"
    script.write_text(SCRIPTS[name])
    argv = [sys.executable, str(script), "an argument"]
    if os.environ.get("OPENGPT_TESTS_FORK", "1") == "0":
        pytest.skip("OPENGPT_TESTS_FORK=0: no fork server")
    FORK_SERVER.serves({})  # starts the server where none runs
    env = FORK_SERVER.env  # the server's own: a fresh interpreter then starts as its children do
    fresh = subprocess.run(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    forked = FORK_SERVER.run(argv, str(tmp_path), env, timeout=60)
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    # a traceback names the server's frames too; its last line, the error, is the same
    assert forked.stderr.strip().splitlines()[-1:] == fresh.stderr.strip().splitlines()[-1:]
