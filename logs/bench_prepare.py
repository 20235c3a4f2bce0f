"""How long and how much memory prepare.py takes on a large corpus, with 1 and more processes.

    python -m logs.bench_prepare                          # ~1 GB, --num_proc 1 and 2, the default BPE reused
    python -m logs.bench_prepare --size_mb=200 --tokenizer=gpt2 --num_procs=1,2,4

It writes a Chinese-and-English corpus of about size_mb MB of JSONL (the embedded default corpus
and English prose from the docstrings of Python's standard library, repeated with perturbations,
so that no two documents are the same) into a temporary folder, then runs the real prepare.py on
it once per --num_proc value and reports, for each: wall time, throughput (MB of document text per
second, both passes included), and the peak resident memory of the whole process tree (prepare.py
and its workers, their RSS summed every 0.1 s: shared pages count once per process, so this errs
high). It checks that every run wrote the same bytes.

The tokenizer is not trained on the big corpus: training would dominate and is bounded apart
(--tokenizer_sample_chars). --tokenizer=bpe (the default) first prepares the embedded default
corpus, untimed, and reuses the byte-level BPE trained there (8192 tokens), as
`--tokenizer=data/zh_default` does; --tokenizer=gpt2 uses GPT-2's BPE.
"""
import ast
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run by path (python logs/X.py) as well as python -m logs.X
from opengpt import corpus
from opengpt.cli import UserError, run
from configurator import parse_args

DEFAULTS = dict(
    size_mb=1000,  # corpus size in MB of JSONL
    num_procs="1,2",  # the --num_proc values to run, in order
    tokenizer="bpe",  # bpe (the default corpus's, reused) | gpt2
    file_mb=128,  # the corpus is a folder of files of about this size
    work_dir="",  # where the corpus and outputs go; default a temporary folder, removed at the end
)
PREPARE = os.path.join(REPO, "prepare.py")


def english_paragraphs():
    """Paragraphs of English prose, offline: the docstrings of the standard library's modules,
    classes and functions, read with ast (nothing is imported)."""
    paragraphs = []
    stdlib = sysconfig.get_paths()["stdlib"]
    for folder, _, files in sorted(os.walk(stdlib)):
        if "site-packages" in folder or "test" in folder:
            continue
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    paragraphs += [p.strip() for p in (doc or "").split("\n\n") if len(p.strip()) > 80]
    return paragraphs


def write_corpus(folder, size_mb, file_mb):
    """JSONL files of perturbed Chinese and English documents, about size_mb MB in all; returns
    (bytes written, documents written)."""
    chinese = list(corpus.default_corpus())
    english = english_paragraphs()
    rng = random.Random(0)
    os.makedirs(folder, exist_ok=True)
    written = documents = part = 0
    out = None
    while written < size_mb * 1e6:
        for i, doc in enumerate(chinese):
            if out is None or out.tell() > file_mb * 1e6:
                if out is not None:
                    out.close()
                out = open(os.path.join(folder, f"part-{part:03d}.jsonl"), "w", encoding="utf-8")
                part += 1
            if i % 3 == 0:  # about a third of the text in English
                words = rng.choice(english).split()
                cut = rng.randrange(len(words))
                doc = " ".join(words[cut:] + words[:cut])
            else:
                cut = rng.randrange(len(doc))
                doc = doc[cut:] + doc[:cut]
            line = json.dumps({"text": f"{doc} ({rng.randrange(10**6)})"}, ensure_ascii=False) + "\n"
            out.write(line)
            written += len(line.encode("utf-8"))
            documents += 1
            if written >= size_mb * 1e6:
                break
    out.close()
    return written, documents


def process_tree_rss(pid):
    """Resident bytes of a process and all its descendants, summed (0 once it is gone)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    stack += [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def run_prepare(args):
    """(wall seconds, peak RSS of the process tree in bytes) of one prepare.py run."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, PREPARE, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    try:
        while proc.poll() is None:
            peak = max(peak, process_tree_rss(proc.pid))
            time.sleep(0.1)
    finally:  # Ctrl-C or an error here: prepare.py is not left running on its own
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise UserError(f"prepare.py {' '.join(args)} failed: {stderr.strip()[-500:]}")
    return wall, peak, stdout


def folder_digest(folder):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(name.encode() + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    num_procs = [int(n) for n in str(cfg["num_procs"]).split(",")]
    if cfg["size_mb"] <= 0:
        raise UserError(f"--size_mb={cfg['size_mb']} must be above 0")
    if cfg["work_dir"]:
        try:
            os.makedirs(cfg["work_dir"], exist_ok=True)
        except OSError as e:  # a file on the way
            raise UserError(f"cannot make --work_dir={cfg['work_dir']}: {e.strerror or e}") from None
    work = cfg["work_dir"] or tempfile.mkdtemp(prefix="bench_prepare_")
    try:
        start = time.perf_counter()
        size, documents = write_corpus(os.path.join(work, "corpus"), cfg["size_mb"], cfg["file_mb"])
        print(f"corpus: {size / 1e6:,.0f} MB of JSONL, {documents:,} documents, written in {time.perf_counter() - start:.0f} s", flush=True)
        tokenizer = "gpt2"
        if cfg["tokenizer"] == "bpe":
            tokenizer = os.path.join(work, "zh_default")
            run_prepare([f"--out={tokenizer}"])  # untimed: trains the default tokenizer
        print(f"tokenizer: {cfg['tokenizer']} ({'reused from the default corpus' if cfg['tokenizer'] == 'bpe' else 'GPT-2'})")
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
        digests = {}
        for num_proc in num_procs:
            out = os.path.join(work, f"out_{num_proc}")
            wall, peak, stdout = run_prepare([f"--input={os.path.join(work, 'corpus')}", f"--out={out}",
                                              f"--tokenizer={tokenizer}", f"--num_proc={num_proc}"])
            with open(os.path.join(out, "meta.json"), encoding="utf-8") as f:
                splits = json.load(f)["splits"]
            text_mb = sum(s["bytes"] for s in splits.values()) / 1e6
            tokens = sum(s["tokens"] for s in splits.values())
            digests[num_proc] = folder_digest(out)
            print(f"--num_proc={num_proc}: {wall:,.0f} s, {text_mb / wall:.2f} MB/s of text ({text_mb:,.0f} MB, "
                  f"{tokens / 1e6:,.0f}M tokens), peak RSS of the process tree {peak / 2**30:.2f} GiB, "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
            shutil.rmtree(out)
        same = len(set(digests.values())) == 1
        print(f"same output bytes from every run: {same}")
        if not same:
            raise UserError(f"runs wrote different bytes: {digests}")
    finally:
        if not cfg["work_dir"]:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run(main)
