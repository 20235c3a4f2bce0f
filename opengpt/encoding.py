"""Tokenizing a corpus's chunks, in this process or in several: prepare.py's encoder.

Each chunk's documents become tokens with <|endoftext|> after each one, split by train/val, and
counted per split and per source. With several processes, one that dies (the out-of-memory killer,
a crash) ends the run with one line naming the document it was encoding, where multiprocessing.Pool
would wait for ever; a tokenizer that panics (a BaseException in Rust bindings) is one line too.
"""
import contextlib
import itertools
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import traceback

import numpy as np

from opengpt import tokenizer as tok
from opengpt.cli import UserError
from opengpt.data_layout import SPLITS


_worker = {}  # what encode_chunk uses, in whichever process runs it: tokenizer, dtype, and where it notes its document


def describe_document(index, document):
    return f"document {index + 1:,} ({len(document):,} characters: {document[:30]!r})"


@contextlib.contextmanager
def stderr_to_devnull():
    """fd 2 to /dev/null: a Rust tokenizer that panics prints its message and a backtrace there
    before it raises PanicException, which encode_document words in one line instead."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def encode_document(tokenizer, index, document):
    try:
        return tokenizer.encode_batch([document], num_threads=1)[0]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # a panic in a Rust tokenizer is a BaseException (PanicException)
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"the tokenizer failed on {describe_document(index, document)}: {type(e).__name__}: {reason}; "
                        f"leave that document out, or use another --tokenizer") from None


def encode_chunk(chunk):
    """For each split: the chunk's documents in it as tokens, <|endoftext|> after each one, their
    counts (documents, characters, UTF-8 bytes, tokens), and the same counts per source ("sources":
    one entry for each run of consecutive documents of one source, in order).
    A chunk is (index of its first document, [(is_val, source, document), ...])."""
    first, documents = chunk
    tokenizer, dtype, current, slot = (_worker[key] for key in ("tokenizer", "dtype", "current", "slot"))
    ids = []
    with stderr_to_devnull():
        for index, (_, _, document) in enumerate(documents, first):
            current[slot] = index  # read by the main process if this one dies
            ids.append(encode_document(tokenizer, index, document))
    eot = np.array([tokenizer.eot_token], dtype=dtype)
    encoded = {}
    for split in SPLITS:
        picked = [(source, document, doc_ids) for (is_val, source, document), doc_ids in zip(documents, ids) if is_val == (split == "val")]
        pieces = [piece for _, _, doc_ids in picked for piece in (np.array(doc_ids, dtype=dtype), eot)]
        tokens = np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)
        encoded[split] = dict(tokens=tokens, **document_counts(picked), sources=source_counts(picked))
    return encoded


def document_counts(picked):
    """documents, characters and UTF-8 bytes of (source, document, token ids) triples."""
    return dict(documents=len(picked), characters=sum(len(document) for _, document, _ in picked),
                bytes=sum(len(document.encode("utf-8")) for _, document, _ in picked))


def source_counts(picked):
    """document_counts of each run of consecutive documents of one source, with its source's name
    and its tokens (each document's own and its <|endoftext|>)."""
    counts = []
    for source, run in itertools.groupby(picked, key=lambda triple: triple[0]):
        run = list(run)
        counts.append(dict(source=source, **document_counts(run), tokens=sum(len(doc_ids) + 1 for _, _, doc_ids in run)))
    return counts


def encoder_process(pipe, current, slot, tokenizer_spec, dtype_name):
    """A tokenizing process: encode_chunk of each chunk that comes down the pipe, until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process: the main one handles it
    end_with_parent()
    _worker.update(tokenizer=tok.from_spec(tokenizer_spec), dtype=np.dtype(dtype_name), current=current, slot=slot)
    while True:
        try:
            chunk = pipe.recv()
        except (EOFError, OSError):  # the main process is done, or gone (a reset if it left an answer unread)
            return
        try:
            answer = ("tokens", encode_chunk(chunk))
        except UserError as e:
            answer = ("error", str(e))
        except Exception:
            answer = ("bug", traceback.format_exc())
        try:
            pipe.send(answer)
        except OSError:
            return


def end_with_parent():
    """Linux: the kernel kills this process when its parent ends, even by kill -9 while this one is
    stuck in a document (elsewhere it ends at its next read from the closed pipe)."""
    if sys.platform.startswith("linux"):
        import ctypes
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


class TokenizingProcessDied(Exception):
    """A tokenizing process ended without an answer: killed (the out-of-memory killer), or crashed.
    Its arguments: what happened, and what may help."""


class EncoderProcesses:
    """num_proc tokenizing processes, their answers handed back in corpus order. Each has one chunk
    at a time (so neither side can block the other on a full pipe), and at most 2 * num_proc chunks
    are out at once, so memory stays bounded. Pool would wait for ever on a process that died; here
    its end is seen (its sentinel) and named with the document it was encoding."""

    def __init__(self, num_proc, tokenizer, dtype):
        spawn = multiprocessing.get_context("spawn")  # fresh processes, no copy of this one's threads and locks
        self.current = spawn.RawArray("q", num_proc)  # the document each process is encoding
        self.processes, self.pipes = [], []
        for slot in range(num_proc):
            ours, theirs = spawn.Pipe()
            process = spawn.Process(target=encoder_process, daemon=True,
                                    args=(theirs, self.current, slot, tokenizer.spec, dtype.name))
            process.start()
            theirs.close()  # so that its end reads as EOF here
            self.processes.append(process)
            self.pipes.append(ours)

    def encode(self, chunks):
        """encode_chunk of each chunk, in order."""
        chunks = iter(chunks)
        idle, busy, done = list(range(len(self.processes))), {}, {}  # busy: slot -> (number, chunk); done: number -> answer
        sent = handed = 0
        while True:
            while idle and sent - handed < 2 * len(self.processes) and (chunk := next(chunks, None)) is not None:
                slot = idle.pop()
                busy[slot] = (sent, chunk)
                try:
                    self.pipes[slot].send(chunk)
                except OSError:
                    raise self.died(slot, busy) from None
                sent += 1
            if handed in done:
                yield done.pop(handed)
                handed += 1
            elif busy:
                self.receive(busy, idle, done)
            else:
                return

    def receive(self, busy, idle, done):
        """Wait until a busy process answers, or any process ends."""
        pipes = {self.pipes[slot]: slot for slot in busy}
        sentinels = {process.sentinel: slot for slot, process in enumerate(self.processes)}
        for ready in multiprocessing.connection.wait([*pipes, *sentinels]):
            slot = pipes.get(ready, sentinels.get(ready))
            if ready in sentinels:
                raise self.died(slot, busy)
            try:
                kind, answer = ready.recv()
            except (EOFError, OSError):  # it ended mid-answer
                raise self.died(slot, busy) from None
            if kind == "error":
                raise UserError(answer)
            if kind == "bug":
                raise RuntimeError(f"a tokenizing process failed:\n{answer}")
            done[busy.pop(slot)[0]] = answer
            idle.append(slot)

    def died(self, slot, busy):
        process = self.processes[slot]
        process.join(5)
        code = process.exitcode
        try:
            how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"ended (exit status {code})"
        except ValueError:
            how = f"was killed by signal {-code}"
        if code == -signal.SIGKILL:
            how += " (as the out-of-memory killer does)"
        fix = "Free some memory, or lower --num_proc"
        if slot in busy:
            first, documents = busy[slot][1]
            index = self.current[slot]
            if first <= index < first + len(documents):
                how += f" while encoding {describe_document(index, documents[index - first][-1])}"
                fix = "Free some memory, lower --num_proc, or leave that document out"
        return TokenizingProcessDied(f"a tokenizing process {how}", fix)

    def close(self):
        """End the processes: an idle one reads EOF and ends; a busy or stuck one is killed."""
        for pipe in self.pipes:
            pipe.close()
        deadline = time.monotonic() + 1
        for process in self.processes:
            process.join(max(0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


def encoded_chunks(chunks, tokenizer, dtype, num_proc):
    """encode_chunk of each chunk, in order: in this process when num_proc is 1, else in num_proc
    tokenizing processes."""
    if num_proc == 1:
        _worker.update(tokenizer=tokenizer, dtype=dtype, current=[0], slot=0)
        yield from map(encode_chunk, chunks)
        return
    processes = EncoderProcesses(num_proc, tokenizer, dtype)
    try:
        yield from processes.encode(chunks)
    finally:
        processes.close()
