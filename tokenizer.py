"""GPT-2 BPE through tiktoken, built offline from ranks shipped inside a PyPI package.

tiktoken.get_encoding("gpt2") downloads its ranks from the internet on first use. The same ranks
(sha256 below, identical to tiktoken's gpt2 / r50k_base) ship as `assets/gpt2.tiktoken` inside the
`mlx-whisper` and `openai-whisper` wheels, so we build the Encoding from that file instead.
"""
import base64
import hashlib
import importlib.util
import os
from functools import lru_cache

GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_VOCAB_SIZE = 50257
EOT_TOKEN = 50256
# tiktoken's r50k_base pre-tokenisation pattern (the regex GPT-2 splits text with before BPE).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
RANK_PACKAGES = ("mlx_whisper", "whisper")
INSTALL_HINT = "pip install --no-deps mlx-whisper==0.4.3"


def find_gpt2_ranks():
    """Path of gpt2.tiktoken inside an installed whisper package; None if none is installed."""
    override = os.environ.get("GPT2_TIKTOKEN_FILE")
    if override:
        return override
    for package in RANK_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            path = os.path.join(folder, "assets", "gpt2.tiktoken")
            if os.path.isfile(path):
                return path
    return None


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
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


def get_encoding(name):
    """Tokenizer by the name stored in meta.json. Only 'gpt2' exists today."""
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; this project knows only 'gpt2'")
    return gpt2_encoding()
