"""Shared test fixtures: a tiny learnable Chinese corpus, prepared once, and script runners."""
import json
import locale
import os
import random
import resource
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# A suite a script starts in the background (`pytest ... &`) inherits SIGINT ignored, as would the scripts it
# runs, and their Ctrl-C tests would wait for an exit that never comes: a handler set here ends at their exec
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A model this small trains in seconds on a CPU; the data still uses the real GPT-2 vocabulary.
TINY_MODEL_ARGS = [
    "--device=cpu", "--dtype=float32", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16",
    "--batch_size=4", "--gradient_accumulation_steps=1", "--dropout=0.0", "--bias=True",
]

PHRASES = ["滚滚长江东逝水", "浪花淘尽英雄", "是非成败转头空", "青山依旧在", "几度夕阳红",
           "白发渔樵江渚上", "惯看秋月春风", "一壶浊酒喜相逢", "古今多少事", "都付笑谈中"]


def tiny_documents(n_docs, seed=0):
    """Short documents made of a few fixed phrases: easy to learn, so a loss drop is visible fast."""
    rng = random.Random(seed)
    return ["，".join(rng.choice(PHRASES) for _ in range(rng.randint(2, 5))) + "。" for _ in range(n_docs)]


def run_script(script, *args, timeout=300, cwd=REPO, env=None, memory_limit=None):
    """Run one of the repo's scripts as `python SCRIPT ARGS` does; returns the CompletedProcess. The
    process is forked from an interpreter that has already imported torch (FORK_SERVER below), unless
    the environment differs in a variable that importing torch or numpy reads. memory_limit: its
    RLIMIT_AS in bytes, so that a script that believes a crafted size fails fast."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    if script.startswith("logs/"):  # the lab notebook's scripts run as modules of the logs package
        full_env["PYTHONPATH"] = REPO
        command = ["-m", script[:-len(".py")].replace("/", ".")]
    else:
        command = [os.path.join(REPO, script)]
    argv = [sys.executable, *command, *map(str, args)]
    if FORK_SERVER.serves(full_env):
        return FORK_SERVER.run(argv, str(cwd), full_env, timeout, memory_limit)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if memory_limit else None)


# The fork server's loop. Each request line (JSON) is one `python SCRIPT ARGS` or `python -m MODULE
# ARGS`: a forked child takes its working folder, environment, argv and sys.path[0] as that
# interpreter would, stdin from /dev/null and stdout/stderr into the request's files, its RLIMIT_AS
# where the request sets one, runs the script as __main__ and ends as that interpreter does: SystemExit's
# status or a traceback and 1, then its threads waited for, atexit, stdio flushed, but not the teardown of
# every module, which in a child of an interpreter that imported torch costs a second. The server
# answers the child's pid, then its wait status.
FORK_SERVER_CODE = r"""
import atexit, json, os, resource, runpy, signal, sys, threading
import numpy, torch  # the seconds that every script's fresh interpreter would spend again
import torch._dynamo  # as much again: torch.optim and torch.compile import it in every script
try:
    from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM  # export.py, from_pretrained, the untrusted-model checks
except ImportError:
    pass

def run(request):
    if request["memory_limit"]:
        resource.setrlimit(resource.RLIMIT_AS, (request["memory_limit"], request["memory_limit"]))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(os.open(request["stdout"], os.O_WRONLY), 1)
    os.dup2(os.open(request["stderr"], os.O_WRONLY), 2)
    argv = request["argv"][1:]
    if argv[0] == "-m":
        sys.argv = argv[1:]
        sys.path[0] = os.getcwd()
        sys.path[1:1] = [entry for entry in request["env"].get("PYTHONPATH", "").split(os.pathsep) if entry]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")

def exit_as_python_does(request):
    status, interrupted = 0, False
    try:
        run(request)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:
        sys.excepthook(type(e), e, e.__traceback__)
        status, interrupted = 1, isinstance(e, KeyboardInterrupt)
    threading._shutdown()  # what Py_FinalizeEx does first, then atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if interrupted:  # as python does: it ends by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status & 0xFF)

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        exit_as_python_does(request)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


class ForkServer:
    """An interpreter, started once per test session, that forks each script run_script runs: a fresh
    interpreter spends seconds importing torch, and the suite runs scripts hundreds of times."""

    # what importing torch or numpy reads from the environment: a run whose environment differs from
    # the server's in one of these gets a fresh interpreter instead
    IMPORT_TIME = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS", "NUMPY", "PYTORCH", "TORCH", "CUDA", "NVIDIA", "HIP",
                   "ROCM", "PYTHON", "LD_", "MALLOC", "LC_", "LANG")

    def __init__(self):
        self.process, self.env = None, None

    # read when used, not at import: torch writes its compile cache folder into os.environ at the first
    # in-process compile, and a server that told that run from the others would serve no later run
    READ_WHEN_USED = ("PYTHONPATH", "TORCHINDUCTOR_CACHE_DIR")

    def import_time(self, env):
        return {k: v for k, v in env.items() if k.startswith(self.IMPORT_TIME) and k not in self.READ_WHEN_USED}

    def serves(self, env):
        if os.environ.get("OPENGPT_TESTS_FORK", "1") == "0":  # =0: every script in a fresh interpreter
            return False
        if self.process is None or self.process.poll() is not None:
            self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
            self.process = subprocess.Popen([sys.executable, "-c", FORK_SERVER_CODE], cwd=REPO, env=self.env, bufsize=0,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return self.import_time(env) == self.import_time(self.env)

    def answer(self):
        line = self.process.stdout.readline()  # unbuffered, so that select below sees what is not read yet
        if not line:
            raise RuntimeError("the tests' fork server died; OPENGPT_TESTS_FORK=0 runs every script in a fresh interpreter")
        return int(line)

    def run(self, argv, cwd, env, timeout, memory_limit=None):
        with tempfile.TemporaryDirectory() as folder:
            out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
            for path in (out, err):
                open(path, "w").close()
            try:
                self.process.stdin.write((json.dumps(dict(argv=argv, cwd=cwd, env=env, stdout=out, stderr=err, memory_limit=memory_limit)) + "\n").encode())
                pid = self.answer()
                timed_out = not select.select([self.process.stdout], [], [], timeout)[0]
                if timed_out:
                    os.kill(pid, signal.SIGKILL)
                status = self.answer()
            except BaseException:  # interrupted: the server's answers are out of step, start another
                self.close(kill=True)
                raise
            stdout, stderr = (open(path, encoding=locale.getpreferredencoding(False)).read() for path in (out, err))
        if timed_out:
            raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
        return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), stdout, stderr)

    def close(self, kill=False):
        if self.process is not None:
            if kill:
                self.process.kill()
            self.process.stdin.close()
            self.process.wait()
            self.process = None


FORK_SERVER = ForkServer()


@pytest.fixture(scope="session", autouse=True)
def _close_the_fork_server():
    yield
    FORK_SERVER.close()


def pause(process, seconds):
    """Stop a running process for `seconds` (SIGSTOP), as a suspended laptop or a swapped-out job is, then let it go on."""
    process.send_signal(signal.SIGSTOP)
    time.sleep(seconds)
    process.send_signal(signal.SIGCONT)


def is_running(pid):
    """Whether process pid runs (a zombie, ended but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_user_error(result, *words):
    """The contract for a user's mistake, for a finished script (a CompletedProcess)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert_one_line_error(result.returncode, result.stderr, *words)


def assert_one_line_error(returncode, stderr, *words):
    """The contract for a user's mistake: exit status 2, one line on stderr naming it, no traceback."""
    assert returncode == 2, (returncode, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def read_events(out_dir, kind=None):
    """The events of a run's metrics.jsonl, all of them or those of one kind."""
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [e for e in map(json.loads, f) if kind is None or e["event"] == kind]


def prepared_tiny_corpus(tmp_path_factory, name, *flags):
    """A data folder that prepare.py made of 400 tiny documents, with its tokenizer flags."""
    root = tmp_path_factory.mktemp(name)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(tiny_documents(400)) + "\n", encoding="utf-8")
    out = root / "data"
    result = run_script("prepare.py", f"--input={corpus}", f"--out={out}", "--min_val_docs=40", *flags)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared data folder (train.bin, val.bin, meta.json) of 400 tiny documents, GPT-2's BPE."""
    return prepared_tiny_corpus(tmp_path_factory, "tiny_data", "--tokenizer=gpt2")


@pytest.fixture(scope="session")
def tiny_bpe_data(tmp_path_factory):
    """The same documents with a byte-level BPE of 300 tokens trained on their train split."""
    return prepared_tiny_corpus(tmp_path_factory, "tiny_bpe_data", "--vocab_size=300")


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(size, read_only=False): an empty folder on a fresh tmpfs of that size ("200k"),
    unmounted after the test. A real full or read-only filesystem; it needs root (else the test
    skips: read_only_folder below covers the read-only case for other users)."""
    mounted = []

    def mount(size, read_only=False):
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def read_only_folder(tmp_path, mount_tmpfs):
    """An existing folder nobody can write in: a read-only tmpfs for root (whom permissions do not
    stop), a folder without write permission for anyone else."""
    if os.geteuid() == 0:
        yield mount_tmpfs("1m", read_only=True)
        return
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    yield folder
    folder.chmod(stat.S_IRWXU)  # so that pytest can remove it
