"""prepare.py never loses a run or a file that is not its own, and never hangs (issue 26): real
processes, real signals, every victim file checksummed before and after."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import prepare
from conftest import REPO, assert_one_line_error, assert_user_error, is_running, run_script, tiny_documents


def tree_digest(root):
    """{relative path: sha256 of a file, or 'link -> target', or 'folder'} of everything under root
    but lock files (prepare.py's own, beside its folder: they hold the pid of the latest run)."""
    digest = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            key = os.path.relpath(path, root)
            if name.endswith(".lock"):
                continue
            if os.path.islink(path):
                digest[key] = f"link -> {os.readlink(path)}"
            elif os.path.isdir(path):
                digest[key] = "folder"
            else:
                with open(path, "rb") as f:
                    digest[key] = hashlib.sha256(f.read()).hexdigest()
    return digest


def corpus_file(path, docs):
    path.write_text("\n".join(docs), encoding="utf-8")
    return path


def prepare_ok(*args):
    result = run_script("prepare.py", *args)
    assert result.returncode == 0, result.stderr
    return result


def prepared(folder, seed=1, n_docs=100):
    """A folder prepare.py wrote, of its own small corpus."""
    source = corpus_file(folder.parent / f"old{seed}.txt", tiny_documents(n_docs, seed=seed))
    prepare_ok(f"--input={source}", f"--out={folder}", "--tokenizer=gpt2")
    return folder


# ---- item 3: only what prepare.py made is removed ----

@pytest.mark.parametrize("victim", [".notes.tmp", ".tmp/draft.txt", ".train.bin.tmp"])
def test_hidden_files_in_out_are_refused_not_swapped_away(tmp_path, victim):
    out = prepared(tmp_path / "data")
    (out / victim).parent.mkdir(exist_ok=True)
    (out / victim).write_text("my notes", encoding="utf-8")
    source = corpus_file(tmp_path / "new.txt", tiny_documents(50, seed=2))
    before = tree_digest(tmp_path)
    result = run_script("prepare.py", f"--input={source}", f"--out={out}", "--tokenizer=gpt2")
    assert_user_error(result, "holds files prepare.py did not write", victim.split("/")[0])
    assert tree_digest(tmp_path) == before


def test_the_temporary_files_of_an_older_prepare_are_its_own(tmp_path):
    """Before the staged folder, prepare.py wrote .NAME.tmp<pid> inside --out; a kill left them there."""
    out = prepared(tmp_path / "data")
    (out / ".train.bin.tmp4242").write_bytes(b"half a token file")
    prepare_ok(f"--input={corpus_file(tmp_path / 'new.txt', tiny_documents(50, seed=2))}", f"--out={out}", "--tokenizer=gpt2")
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


@pytest.mark.parametrize("out_exists", [True, False])
def test_sibling_folders_named_like_a_stage_are_left_alone(tmp_path, out_exists):
    """.data.old-backup is the user's; so is .data.new-123 without the marker prepare.py puts in its own."""
    out = prepared(tmp_path / "data") if out_exists else tmp_path / "data"
    for sibling in (".data.old-backup", ".data.old-123", ".data.new-123", ".data.staging-123"):
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "meta.json").write_text(f"the user's {sibling}", encoding="utf-8")
    before = {name: digest for name, digest in tree_digest(tmp_path).items() if name.startswith(".data.")}
    prepare_ok(f"--input={corpus_file(tmp_path / 'new.txt', tiny_documents(60, seed=2))}", f"--out={out}", "--tokenizer=gpt2")
    assert {name: digest for name, digest in tree_digest(tmp_path).items() if name.startswith(".data.")} == before
    assert json.loads((out / "meta.json").read_text(encoding="utf-8"))["splits"]["train"]["documents"] > 0


def test_a_staging_folder_of_a_live_process_is_left_alone(tmp_path):
    from opengpt import staged_folder
    out = tmp_path / "data"
    staging = tmp_path / f".data.staging-{os.getppid()}"  # pytest's parent: alive, and not this process
    staging.mkdir()
    (staging / staged_folder.MARKER).write_text(staged_folder.marker_text(os.getppid()), encoding="utf-8")
    (staging / "old").mkdir()
    before = tree_digest(tmp_path)
    staged_folder.remove_stale_folders(str(out))
    assert tree_digest(tmp_path) == before


SWAP_THEN_PAUSE = """
import os, sys, time
import prepare
from opengpt import cli
rename = os.rename
def rename_then_pause(src, dst):
    rename(src, dst)
    if os.path.realpath(src) == os.path.realpath(os.environ["OUT"]):  # the old folder moved away: half a swap
        open(os.environ["PAUSED_FLAG"], "w").close()
        time.sleep(3600)
os.rename = rename_then_pause
sys.argv[0] = "prepare.py"
cli.run(prepare.main)
"""


def test_a_kill_9_between_the_two_renames_is_undone_by_the_next_run(tmp_path):
    out = prepared(tmp_path / "data")
    before = tree_digest(out)
    flag = tmp_path / "flag"
    env = dict(os.environ, PYTHONPATH=REPO, PAUSED_FLAG=str(flag), OUT=str(out), OMP_NUM_THREADS="1")
    new = corpus_file(tmp_path / "new.txt", tiny_documents(80, seed=3))
    proc = subprocess.Popen([sys.executable, "-c", SWAP_THEN_PAUSE, f"--input={new}", f"--out={out}", "--tokenizer=gpt2"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(flag, proc)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert not out.exists()  # killed half-way through the swap: the old folder is only beside it
    # the next run puts the old folder back before anything else, even one that then fails
    assert_user_error(run_script("prepare.py", f"--input={new}", f"--out={out}", "--vocab_size=5000"), "too large for this corpus")
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".data.lock"]


NOTES_WHILE_WRITING = """
import os, sys
import prepare
from opengpt import cli
write_token_files = prepare.write_token_files
def write_then_add_notes(*args):
    counts = write_token_files(*args)
    with open(os.path.join(os.environ["OUT"], "notes.md"), "w") as f:  # the user, while the run writes
        f.write("mine")
    return counts
prepare.write_token_files = write_then_add_notes
sys.argv[0] = "prepare.py"
cli.run(prepare.main)
"""


def test_a_file_put_into_out_while_the_run_writes_is_not_swapped_away(tmp_path):
    """--out is checked for others' files before the run, and again once it is renamed away in the swap:
    a file that came in between keeps the folder as it was (the run's output discarded)."""
    out = prepared(tmp_path / "data")
    before = tree_digest(out)
    new = corpus_file(tmp_path / "new.txt", tiny_documents(80, seed=3))
    result = subprocess.run([sys.executable, "-c", NOTES_WHILE_WRITING, f"--input={new}", f"--out={out}", "--tokenizer=gpt2"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, OUT=str(out)), capture_output=True, text=True)
    assert_user_error(result, f"{out} gained files while this run wrote its replacement (notes.md); it is left as it was")
    assert tree_digest(out) == before | {"notes.md": hashlib.sha256(b"mine").hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".data.lock"]


def test_the_current_folder_and_a_mount_point_are_refused_as_out(tmp_path, mount_tmpfs):
    """Neither can be swapped whole: the shell's folder would vanish under it; a mount point cannot be renamed."""
    here = tmp_path / "here"
    here.mkdir()
    source = corpus_file(tmp_path / "in.txt", tiny_documents(50))
    result = subprocess.run([sys.executable, os.path.join(REPO, "prepare.py"), f"--input={source}", "--out=.", "--tokenizer=gpt2"],
                            cwd=here, capture_output=True, text=True)
    assert_user_error(result, "--out=. is the current folder, which prepare.py would replace whole; give a folder inside it, e.g. --out=./mine")
    assert os.listdir(here) == []
    disk = mount_tmpfs("1m")
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={disk}", "--tokenizer=gpt2"), "is a mount point")
    assert os.listdir(disk) == []


# ---- item 30: a symlinked --out ----

def test_a_symlinked_out_replaces_the_folder_it_points_to_and_stays_a_link(tmp_path):
    (tmp_path / "disk").mkdir()
    target = prepared(tmp_path / "disk" / "real")
    old_meta = (target / "meta.json").read_bytes()
    link = tmp_path / "data"
    link.symlink_to(target)
    prepare_ok(f"--input={corpus_file(tmp_path / 'new.txt', tiny_documents(70, seed=5))}", f"--out={link}", "--tokenizer=gpt2")
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (link / "meta.json").read_bytes() == (target / "meta.json").read_bytes() != old_meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "disk", "new.txt"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == [".real.lock", "old1.txt", "real"]


def test_a_dangling_symlinked_out_gets_its_folder(tmp_path):
    link = tmp_path / "data"
    link.symlink_to(tmp_path / "disk" / "real")
    prepare_ok(f"--input={corpus_file(tmp_path / 'in.txt', tiny_documents(70, seed=5))}", f"--out={link}", "--tokenizer=gpt2")
    assert link.is_symlink() and (tmp_path / "disk" / "real" / "meta.json").is_file()


def test_a_symlink_loop_as_out_is_one_line_and_stays(tmp_path):
    source = corpus_file(tmp_path / "in.txt", tiny_documents(70, seed=5))
    (tmp_path / "data").symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(tmp_path / "data")
    before = tree_digest(tmp_path)
    result = run_script("prepare.py", f"--input={source}", f"--out={tmp_path / 'data'}", "--tokenizer=gpt2")
    assert_user_error(result, f"--out={tmp_path / 'data'}", "symbolic link")
    assert tree_digest(tmp_path) == before


# ---- items 10, 24, 27: workers that die, panic or hang; how many there are ----

FAULTY_PREPARE = '''
"""prepare.py with faults planted in GPT-2's encoder, here and in the worker processes it spawns
(they import this file as their __mp_main__): a document that starts with STALL hangs the process
encoding it, after writing its pid to $STALL_FLAG; one that starts with PANIC makes the Rust
tokenizer library panic, for real."""
import os
import sys
import time

import prepare
from opengpt import cli
from opengpt import tokenizer as tok

encode_batch = tok.GPT2Tokenizer.encode_batch


def panic_in_rust():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    catastrophic = Tokenizer(models.BPE())
    catastrophic.pre_tokenizer = pre_tokenizers.Split(Regex("(a+)+$"), "isolated")
    catastrophic.encode("a" * 100 + "!")  # onig gives up backtracking, and tokenizers panics


def encode_batch_with_faults(self, texts, num_threads=None):
    for text in texts:
        if text.startswith("STALL"):
            flag = os.environ["STALL_FLAG"]
            with open(flag + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(flag + ".tmp", flag)
            time.sleep(3600)
        if text.startswith("PANIC"):
            panic_in_rust()
    return encode_batch(self, texts, num_threads)


tok.GPT2Tokenizer.encode_batch = encode_batch_with_faults
if __name__ == "__main__":
    sys.argv[0] = "prepare.py"
    cli.run(prepare.main)
'''


def start_faulty_prepare(tmp_path, *args):
    harness = tmp_path / "faulty_prepare.py"
    harness.write_text(FAULTY_PREPARE, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=REPO, STALL_FLAG=str(tmp_path / "stalled"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(harness), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(flag, proc, seconds=120):
    for _ in range(seconds * 20):
        if flag.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert flag.exists(), proc.communicate(timeout=60)


def finish(proc, timeout=60, workers=()):
    """The process's (returncode, stdout, stderr); a process still running after `timeout` seconds
    hangs, and is killed with its workers (which hold its output pipes open)."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stragglers = worker_pids(proc.pid) if os.path.exists(f"/proc/{proc.pid}/task") else []
        for pid in {proc.pid, *stragglers, *workers}:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        raise AssertionError(f"prepare.py still running {timeout} s later: it hangs") from None
    return proc.returncode, stdout, stderr


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_until_idle(pid, seconds=60):
    """Return once the process has used no CPU for half a second."""
    ticks = cpu_ticks(pid)
    for _ in range(seconds * 2):
        time.sleep(0.5)
        ticks, before = cpu_ticks(pid), ticks
        if ticks == before:
            return
    raise AssertionError(f"process {pid} kept working for {seconds} s")


def worker_pids(pid):
    """The tokenising processes of a prepare.py run (not multiprocessing's resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    workers = []
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                workers.append(child)
    return workers


def faulty_corpus(tmp_path, index, fault, n_docs=3 * prepare.CHUNK_DOCS):
    docs = tiny_documents(n_docs, seed=7)
    docs[index] = f"{fault} {docs[index]}"
    return corpus_file(tmp_path / "in.txt", docs), docs


needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc to find the worker processes")


@needs_proc
def test_a_worker_killed_while_encoding_ends_the_run_in_one_line_naming_the_document(tmp_path):
    """As the out-of-memory killer does: kill -9 of the process encoding a huge document."""
    out = prepared(tmp_path / "data")
    source, docs = faulty_corpus(tmp_path, 1500, "STALL")
    before = tree_digest(out)
    proc = start_faulty_prepare(tmp_path, f"--input={source}", f"--out={out}", "--tokenizer=gpt2", "--num_proc=2")
    wait_for(tmp_path / "stalled", proc)
    os.kill(int((tmp_path / "stalled").read_text()), signal.SIGKILL)
    returncode, _, stderr = finish(proc)
    assert_one_line_error(returncode, stderr, "killed by SIGKILL", "document 1,501", docs[1500][:20], f"{out} is as it was")
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".data.lock"]


@needs_proc
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_worker_killed_while_idle_ends_the_run_and_a_signal_is_not_needed(tmp_path, sig):
    """Pool hung here for good: the dead worker held the task queue's lock, and neither SIGTERM nor
    Ctrl-C could end the run any more."""
    out = prepared(tmp_path / "data")
    before = tree_digest(out)
    source, _ = faulty_corpus(tmp_path, 1500, "STALL")
    proc = start_faulty_prepare(tmp_path, f"--input={source}", f"--out={out}", "--tokenizer=gpt2", "--num_proc=2")
    wait_for(tmp_path / "stalled", proc)
    stuck = int((tmp_path / "stalled").read_text())
    idle = [pid for pid in worker_pids(proc.pid) if pid != stuck]
    assert len(idle) == 1
    wait_until_idle(idle[0])  # the other worker has encoded every other chunk: it waits for work
    os.kill(idle[0], signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)  # a run that did not end by itself must still end on a signal
    returncode, _, stderr = finish(proc)
    assert_one_line_error(returncode, stderr, "a tokenizing process was killed by SIGKILL", f"{out} is as it was")
    assert "document" not in stderr  # it was not encoding one
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".data.lock"]
    assert not is_running(stuck)


@needs_proc
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_run_with_a_stuck_worker_still_stops_on_a_signal_and_the_worker_with_it(tmp_path, sig):
    """A worker stuck in a document (a catastrophic regex) must not outlive its run, even a kill -9."""
    out = prepared(tmp_path / "data")
    before = tree_digest(out)
    source, _ = faulty_corpus(tmp_path, 1500, "STALL")
    proc = start_faulty_prepare(tmp_path, f"--input={source}", f"--out={out}", "--tokenizer=gpt2", "--num_proc=2")
    wait_for(tmp_path / "stalled", proc)
    stuck = int((tmp_path / "stalled").read_text())
    proc.send_signal(sig)
    returncode, _, stderr = finish(proc, workers=[stuck])
    if sig == signal.SIGKILL:
        assert returncode == -9
    else:
        assert returncode == 130 and stderr.strip().splitlines()[-1] == "prepare.py: interrupted", stderr
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".data.lock"]
    assert tree_digest(out) == before
    for _ in range(200):
        if not is_running(stuck):
            break
        time.sleep(0.05)
    assert not is_running(stuck)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_panic_in_the_tokenizer_library_is_one_line_naming_the_document(tmp_path, num_proc):
    out = prepared(tmp_path / "data")
    before = tree_digest(out)
    source, docs = faulty_corpus(tmp_path, 2100, "PANIC")
    proc = start_faulty_prepare(tmp_path, f"--input={source}", f"--out={out}", "--tokenizer=gpt2", f"--num_proc={num_proc}")
    returncode, _, stderr = finish(proc)
    assert_one_line_error(returncode, stderr, "the tokenizer failed on document 2,101", docs[2100][:20],
                          "PanicException", "retry-limit-in-match")
    assert tree_digest(out) == before


@needs_proc
def test_num_proc_is_capped_at_the_cpus_and_the_log_says_so(tmp_path):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    source, _ = faulty_corpus(tmp_path, 10, "STALL", n_docs=(cpus + 3) * prepare.CHUNK_DOCS)
    proc = start_faulty_prepare(tmp_path, f"--input={source}", f"--out={tmp_path / 'data'}", "--tokenizer=gpt2", "--num_proc=1000")
    try:
        wait_for(tmp_path / "stalled", proc)  # every process was started before the first chunk went out
        workers = worker_pids(proc.pid)
    finally:
        proc.terminate()
    _, stdout, _ = finish(proc)
    assert 1 <= len(workers) <= cpus
    assert f"--num_proc=1000 is more than the {cpus} CPUs this process may use: tokenizing in {cpus} processes" in stdout


# ---- items 12, 15, 19: inputs and flags that used to hang or end in a traceback ----

def test_a_folder_with_symlink_loops_is_read_once_per_real_file(tmp_path):
    folder = tmp_path / "corpus"
    docs = tiny_documents(300, seed=8)
    for n, part in enumerate((docs[:100], docs[100:200], docs[200:])):
        (folder / f"sub{n}").mkdir(parents=True)
        corpus_file(folder / f"sub{n}" / "part.txt", part)
        (folder / f"sub{n}" / "up").symlink_to("..")  # three loops: 3^40 paths for a walk that follows them all
    out = tmp_path / "data"
    prepare_ok_within = run_script("prepare.py", f"--input={folder}", f"--out={out}", "--tokenizer=gpt2", timeout=120)
    assert prepare_ok_within.returncode == 0, prepare_ok_within.stderr
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)


@pytest.mark.parametrize("line, words", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"text": "甲", "id": ' + "7" * 5000 + "}", "an integer of more than 4300 digits"),
], ids=["nested 100k deep", "a 5000-digit integer"])
def test_a_jsonl_line_too_deep_or_too_long_a_number_is_one_line_or_skipped(tmp_path, line, words):
    docs = tiny_documents(40, seed=9)
    lines = [json.dumps({"text": d}, ensure_ascii=False) for d in docs]
    lines.insert(17, line)
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "data"
    assert_user_error(run_script("prepare.py", f"--input={source}", f"--out={out}", "--tokenizer=gpt2"),
                      f"{source}:18", words, "--skip_bad_docs=True")
    assert not out.exists()
    result = prepare_ok(f"--input={source}", f"--out={out}", "--tokenizer=gpt2", "--skip_bad_docs=True", "--min_val_docs=5")
    assert "skipped 1 lines" in result.stdout
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta["skipped_lines"] == 1 and meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == len(docs)


@pytest.mark.parametrize("vocab_size", [100_000_000, 1_000_000_000, 10**20])
def test_a_vocab_size_beyond_what_the_trainer_can_hold_is_refused_before_reading(tmp_path, vocab_size):
    out = tmp_path / "data"
    started = time.perf_counter()
    result = run_script("prepare.py", f"--vocab_size={vocab_size}", f"--out={out}")  # the embedded corpus: ~30 s to read
    assert_user_error(result, f"--vocab_size={vocab_size} is more than", "at most 1,048,576")
    assert time.perf_counter() - started < 20 and not out.exists()


def test_ctrl_c_during_the_swap_waits_for_its_end_even_with_other_threads_running():
    """The two renames are not cut apart by a signal that the kernel hands to another thread (torch
    starts several); the signal is delivered once they are done."""
    import threading

    from opengpt import staged_folder
    idle = threading.Event()
    other_thread = threading.Thread(target=idle.wait, daemon=True)
    other_thread.start()  # its signal mask is its own: it may be the thread that takes the signal
    order = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with staged_folder.signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # a handler that were to run now would raise here
                order.append("swap done")
        assert order == ["swap done"]
    finally:
        idle.set()
