"""Tokenizers: GPT-2's BPE (offline) and byte-level BPEs trained on the corpus, behind one interface.

Two kinds, both byte-level, so any UTF-8 text encodes and decodes back exactly (no <unk>):
- "gpt2": GPT-2's 50257-token BPE through tiktoken. tiktoken.get_encoding("gpt2") downloads its
  ranks on first use; the same ranks (sha256 below, identical to tiktoken's gpt2 / r50k_base) ship
  as `assets/gpt2.tiktoken` inside the `mlx-whisper` and `openai-whisper` wheels, so we build the
  Encoding from that file instead. Needed for GPT-2 weights.
- "bpe": a Hugging Face `tokenizers` byte-level BPE, trained on the corpus by prepare.py (GPT-2's
  pre-tokenisation regex, GPT-2's byte alphabet, <|endoftext|> as id 0) or any byte-level
  `tokenizer.json`. It lives as its tokenizer.json text, which data folders, checkpoints and
  exports carry.

Chat tokenizers (chat_format.py) add ChatML's <|im_start|> and <|im_end|> to a "bpe" one as special
tokens: single ids that decode to their text, which text spelling them never encodes to.

A tokenizer's `spec` (plain data: kind, and the json text for "bpe") is what meta.json and
checkpoints record; `from_spec` rebuilds it. `sha256` identifies it across folders and checkpoints.
"""
import base64
import contextlib
import hashlib
import json
import os
import stat
from functools import cached_property, lru_cache

import numpy as np

from opengpt.files import package_data_file

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_VOCAB_SIZE = 50257
EOT_TOKEN = 50256  # GPT-2's <|endoftext|>
EOT_TEXT = "<|endoftext|>"
# ChatML's markers (chat_format.py renders with them). In bits per byte <|im_end|> counts 1, as it ends
# a reply the way <|endoftext|> ends a document; <|im_start|> counts 0 (never a target: it opens a turn).
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKEN_BYTE_LENGTHS = {IM_START: 0, IM_END: 1}
# tiktoken's r50k_base pre-tokenisation pattern (the regex GPT-2 splits text with before BPE).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
# Hugging Face's name for a tokenizer's file: in data folders, exports and transformers folders alike.
TOKENIZER_FILE = "tokenizer.json"
RANK_PACKAGES = ("mlx_whisper", "whisper")
INSTALL_HINT = "pip install --no-deps mlx-whisper==0.4.3"
# The largest --vocab_size train_bpe accepts: 2**20, four times the largest vocabularies in use.
MAX_BPE_VOCAB_SIZE = 1 << 20
# End-of-document tokens a foreign tokenizer.json may use, in order of preference.
EOT_CANDIDATES = (EOT_TEXT, "</s>", "<eos>", "<|im_end|>", "[SEP]")
# Checked on every tokenizer loaded from a file: a tokenizer that cannot give this back is refused.
ROUND_TRIP_TEXT = "滚滚长江东逝水，\n\t浪花淘尽英雄。  全角ＡＢＣ１２３\u3000𠀀𪚥 😀👍🏽 it's GPT-2's café\r\n<|endoftext|>"


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character, so that byte strings can be vocabulary
    keys: printable Latin-1 bytes stand for themselves, the other 68 take the characters from
    U+0100 on, in byte order (openai/gpt-2 encoder.py). Hugging Face's ByteLevel uses the same map."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


class TokenizerError(ValueError):
    """A tokenizer file or flag that cannot be used; the message names the problem and the fix."""


class Tokenizer:
    """What the scripts need of a tokenizer. Subclasses: GPT2Tokenizer, BPETokenizer."""

    kind = ""
    n_vocab = 0
    eot_token = 0

    def encode_batch(self, texts, num_threads=None):
        """Token ids of each text, with special-token text treated as ordinary text; on
        num_threads threads (None: all cores; prepare.py's worker processes use one each)."""
        raise NotImplementedError

    def encode(self, text):
        return self.encode_batch([text])[0]

    def single_token_bytes(self, token):
        raise NotImplementedError

    def special_token_id(self, text):
        """The id of the special token spelt text (e.g. <|im_end|>), None if there is none."""
        return None

    @cached_property
    def token_bytes(self):
        """bytes of every id; <|endoftext|> is b"" (it ends a document, it is not text)."""
        return [b"" if t == self.eot_token else self.single_token_bytes(t) for t in range(self.n_vocab)]

    @cached_property
    def token_byte_lengths(self):
        """UTF-8 bytes each id stands for, as an int64 array; <|endoftext|> counts as 1 (a document
        end, like the newline that separates documents), so bits per byte are defined for it too."""
        lengths = np.array([len(b) for b in self.token_bytes], dtype=np.int64)
        lengths[self.eot_token] = 1
        for text, length in CHAT_TOKEN_BYTE_LENGTHS.items():
            token = self.special_token_id(text)
            if token is not None:
                lengths[token] = length
        return lengths

    def decode_bytes(self, ids):
        table = self.token_bytes
        return b"".join(table[t] for t in ids)

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    @property
    def spec(self):
        raise NotImplementedError

    @property
    def sha256(self):
        raise NotImplementedError

    def describe(self):
        return f"{self.kind} ({self.n_vocab:,} tokens, sha256 {self.sha256[:12]})"


class GPT2Tokenizer(Tokenizer):
    kind = "gpt2"
    n_vocab = GPT2_VOCAB_SIZE
    eot_token = EOT_TOKEN

    def __init__(self):
        self.encoding = gpt2_encoding()

    def encode_batch(self, texts, num_threads=None):
        if num_threads == 1:  # no thread pool at all: cheaper than one of one thread
            return [self.encoding.encode_ordinary(text) for text in texts]
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def single_token_bytes(self, token):
        return self.encoding.decode_single_token_bytes(token)

    @property
    def spec(self):
        return {"kind": "gpt2"}

    @property
    def sha256(self):
        return GPT2_RANKS_SHA256


class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(self, json_text, source=TOKENIZER_FILE):
        from tokenizers import Tokenizer as HFTokenizer

        self.json_text = json_text
        try:
            self.hf = HFTokenizer.from_str(json_text)
        except Exception as e:  # the Rust side raises its own exception types
            raise TokenizerError(f"{source} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:120]})") from None
        # Text that happens to spell <|endoftext|> is text: only prepare.py puts the token between documents.
        self.hf.encode_special_tokens = True
        ids = self.hf.get_vocab(with_added_tokens=True).values()
        self.n_vocab = max(ids, default=-1) + 1  # not their count: a file may leave holes in its ids
        if self.n_vocab > 2 * len(ids):
            raise TokenizerError(f"{source}'s token ids run to {self.n_vocab - 1:,} for {len(ids):,} tokens, mostly holes; "
                                 f"number them from 0 without gaps")
        self._special_ids = set(self.hf.get_added_tokens_decoder())
        self.eot_token = self._find_eot(source)
        self._check_byte_level(source)

    def _find_eot(self, source):
        for text in EOT_CANDIDATES:
            token = self.hf.token_to_id(text)
            if token is not None:
                return token
        raise TokenizerError(f"{source} has no end-of-text token (one of {', '.join(EOT_CANDIDATES)}); "
                             f"add one, or train a tokenizer with prepare.py --tokenizer=bpe")

    def _check_byte_level(self, source):
        to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
        self._byte_of = to_byte
        vocab = self.hf.get_vocab(with_added_tokens=False)
        if len(vocab) < 256 or any(chr_ not in vocab for chr_ in to_byte):
            raise TokenizerError(f"{source} is not a byte-level BPE (its vocabulary lacks some of the 256 byte tokens), "
                                 f"so some text would not round-trip; use a byte-level tokenizer or --tokenizer=bpe")
        ids = self.encode(ROUND_TRIP_TEXT)
        if self.decode_bytes(ids) != ROUND_TRIP_TEXT.encode("utf-8"):
            raise TokenizerError(f"{source} does not give text back exactly (a normaliser or a non-byte-level "
                                 f"pre-tokeniser?); use a byte-level tokenizer or --tokenizer=bpe")

    def encode_batch(self, texts, num_threads=None):
        if num_threads == 1:  # encode_batch would use every core (Rust threads)
            return [self.hf.encode(text, add_special_tokens=False).ids for text in texts]
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def single_token_bytes(self, token):
        text = self.hf.id_to_token(token)
        if token in self._special_ids and text in CHAT_TOKEN_BYTE_LENGTHS:
            return text.encode("utf-8")  # a chat transcript decodes with its markers
        if text is None or token in self._special_ids:
            return b""  # a hole in the ids, or a special token: not text
        return bytes(self._byte_of[char] for char in text)

    def special_token_id(self, text):
        token = self.hf.token_to_id(text)
        return token if token in self._special_ids else None

    def with_special_tokens(self, texts):
        """This tokenizer with the special tokens texts added after its last id (those it has as
        special tokens already are kept): a new tokenizer.json, so a new spec and sha256."""
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(self.json_text)
        hf.add_special_tokens([text for text in texts if self.special_token_id(text) is None])
        return BPETokenizer(hf.to_str(pretty=True), source="the tokenizer with added special tokens")

    @property
    def spec(self):
        return {"kind": "bpe", "json": self.json_text}

    @cached_property
    def sha256(self):
        return hashlib.sha256(self.json_text.encode("utf-8")).hexdigest()


def train_bpe(texts, vocab_size):
    """A byte-level BPE of vocab_size tokens (<|endoftext|>, the 256 bytes, then merges) trained on
    texts: GPT-2's pre-tokenisation and byte alphabet, no normaliser, so text comes back exactly.
    Deterministic: the same texts and size give the same tokenizer.json, byte for byte."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    check_bpe_vocab_size(vocab_size)
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    hf.train_from_iterator(texts, trainer)
    learnt = hf.get_vocab_size(with_added_tokens=True)
    if learnt < vocab_size:
        raise TokenizerError(f"--vocab_size={vocab_size} is too large for this corpus: it has pairs for only "
                             f"{learnt} tokens; use a smaller --vocab_size or more text")
    return BPETokenizer(hf.to_str(pretty=True), source="the trained tokenizer")


def check_bpe_vocab_size(vocab_size):
    """A TokenizerError unless train_bpe can make a tokenizer of vocab_size tokens on some corpus."""
    minimum = 256 + 1
    if vocab_size < minimum + 1:
        raise TokenizerError(f"--vocab_size={vocab_size} is too small: 256 byte tokens + <|endoftext|> leave no room "
                             f"for merges; use at least {minimum + 1} (e.g. 8192)")
    if vocab_size > MAX_BPE_VOCAB_SIZE:
        raise TokenizerError(f"--vocab_size={vocab_size} is more than a trained BPE can have: at most {MAX_BPE_VOCAB_SIZE:,} "
                             f"(the trainer reserves memory for every token up front, and aborts when it is not there)")


# A tokenizer.json of the largest vocabularies is tens of MB; past this the file is not one.
MAX_TOKENIZER_FILE_BYTES = 256 * 1024 * 1024
# Runs of one character this long make a backtracking regex (nested or stacked quantifiers) pass the
# regex library's retry limit, in a fraction of a second; a sound regex reads them in microseconds.
REGEX_PROBE_LENGTH = 1000


def read_tokenizer_file(path):
    """A BPETokenizer from a tokenizer.json, or from a folder holding one (a prepared data folder,
    an export, any Hugging Face fast tokenizer). The file is a regular one of a bounded size (not
    /dev/zero or a pipe), and its regexes do not backtrack without end (probe_regexes)."""
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise TokenizerError(f"tokenizer file {path} is not a regular file (a device, a pipe or a socket); "
                                 f"give a tokenizer.json")
        if info.st_size > MAX_TOKENIZER_FILE_BYTES:
            raise TokenizerError(f"tokenizer file {path} is {info.st_size / 1e6:,.0f} MB, more than any tokenizer.json "
                                 f"(at most {MAX_TOKENIZER_FILE_BYTES / 1e6:,.0f} MB); give a tokenizer.json")
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_TOKENIZER_FILE_BYTES)  # bounded, should it grow after the stat
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file {path} not found; give a tokenizer.json or a folder holding one") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"tokenizer file {path} is unreadable ({type(e).__name__}); give a tokenizer.json") from None
    try:
        json.loads(text)
    except ValueError:
        raise TokenizerError(f"{path} is not JSON; give a Hugging Face tokenizer.json") from None
    with regex_panics_refused(path):
        tokenizer = BPETokenizer(text, source=path)
        probe_regexes(tokenizer)
    return tokenizer


@contextlib.contextmanager
def regex_panics_refused(source):
    """A regex that backtracks without end makes the Rust regex library give up at its retry limit,
    which `tokenizers` reports as a panic: a BaseException, after a Rust backtrace on stderr. Within
    the block stderr is silenced, and such a panic is a TokenizerError naming source."""
    saved_stderr = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise TokenizerError(f"{source} fails on ordinary text ({str(e).strip()[:100]}): a regex that backtracks "
                             f"without end?; use another tokenizer") from None
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)


def probe_regexes(tokenizer):
    """Encode long runs of each character the tokenizer's regexes name (and of a letter, a digit, a
    space, a Chinese character), each alone and followed by a character that ends a match: the text
    that makes a pattern like (a+)+$ backtrack exponentially. Call within regex_panics_refused."""
    patterns = []

    def collect(node):
        if isinstance(node, dict):
            if isinstance(node.get("Regex"), str):
                patterns.append(node["Regex"])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(json.loads(tokenizer.json_text))
    characters = sorted({c for pattern in patterns for c in pattern if c.isalnum()} | set("a0 \n中"))[:64]
    for character in characters if patterns else ():
        for end in ("", "!", "\x00"):
            tokenizer.hf.encode(character * REGEX_PROBE_LENGTH + end, add_special_tokens=False)


def from_spec(spec):
    """The tokenizer a meta.json or checkpoint recorded."""
    if not isinstance(spec, dict):
        raise TokenizerError(f"the tokenizer record is a {type(spec).__name__}, not a dict: it was made by another program or version")
    if spec.get("kind") == "gpt2":
        return GPT2Tokenizer()
    if spec.get("kind") == "bpe" and isinstance(spec.get("json"), str):
        return BPETokenizer(spec["json"], source="the recorded tokenizer")
    raise TokenizerError(f"unknown tokenizer record {str(spec)[:80]}; this project knows 'gpt2' and 'bpe'")


def find_gpt2_ranks():
    """Path of gpt2.tiktoken inside an installed whisper package; None if none is installed."""
    override = os.environ.get("GPT2_TIKTOKEN_FILE")
    if override:
        return override
    paths = (package_data_file(package, os.path.join("assets", "gpt2.tiktoken")) for package in RANK_PACKAGES)
    return next((path for path in paths if path is not None), None)


def load_ranks(path):
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, not the GPT-2 ranks; reinstall with: {INSTALL_HINT}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def gpt2_encoding():
    """The GPT-2 tiktoken Encoding, built offline. Raises FileNotFoundError with the install hint."""
    import tiktoken

    path = find_gpt2_ranks()
    if path is None:
        raise FileNotFoundError(f"GPT-2 BPE ranks not found (assets/gpt2.tiktoken); install them with: {INSTALL_HINT}")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=load_ranks(path),
        special_tokens={EOT_TEXT: EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )
