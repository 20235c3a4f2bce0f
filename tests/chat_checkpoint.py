"""A tiny chat checkpoint and a running serve.py, for test_chat.py, test_serve.py and test_chat_page.py.

The checkpoint is made here, not trained: a byte-level BPE of a few sentences with the chat tokens
added, and a random GPT saved as train.py saves one. The embedding rows of <|im_end|>, <|im_start|>,
<|endoftext|> and of every token that is no printable text alone (a piece of a character, a newline)
are zero, so their logits are 0 while top-k keeps only large positive ones: a reply never ends early,
it runs to max_new_tokens on one line, and every token drawn shows as text.
"""
import os
import re
import subprocess
import sys

import torch

from conftest import REPO, tiny_documents
from model import GPT, GPTConfig
from opengpt import checkpoint as ckpt
from opengpt.chat_format import CHAT_TOKENS, with_chat_tokens
from opengpt.tokenizer import train_bpe

TINY_CHAT = dict(n_layer=1, n_head=2, n_embd=16, block_size=128, vocab_size=320, dropout=0.0, bias=False)
SAMPLING_ARGS = ["--top_k=5", "--device=cpu"]  # see the module docstring


def chat_tokenizer():
    return with_chat_tokens(train_bpe(tiny_documents(300), 300))


def write_chat_checkpoint(out_dir, chat=True, block_size=TINY_CHAT["block_size"], seed=0):
    """A random tiny GPT saved as train.py saves it, with a chat tokenizer (or the base one, chat=False)."""
    tokenizer = chat_tokenizer()
    base = train_bpe(tiny_documents(300), 300)
    torch.manual_seed(seed)
    model_args = TINY_CHAT | {"block_size": block_size}
    model = GPT(GPTConfig(**model_args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for token in never_drawn(tokenizer):
            model.transformer.wte.weight[token] = 0
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    state = ckpt.training_state(model, optimizer, scaler, model_args, 2, 9.9, {}, torch.Generator().manual_seed(0),
                                tokenizer if chat else base, torch.Generator())
    os.makedirs(out_dir, exist_ok=True)
    ckpt.save(state, os.path.join(out_dir, ckpt.FILENAME))
    return out_dir


def never_drawn(tokenizer):
    """The ids the tiny checkpoint never draws (module docstring)."""
    specials = {tokenizer.special_token_id(text) for text in CHAT_TOKENS} | {tokenizer.eot_token}
    return sorted(specials | {token for token, data in enumerate(tokenizer.token_bytes) if not is_text(data)})


def is_text(data):
    try:
        return data.decode("utf-8").isprintable()
    except UnicodeDecodeError:
        return False


class Server:
    """serve.py in a subprocess on a free port (--port=0: the system picks; serve.py prints it)."""

    def __init__(self, out_dir, *args):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), f"--out_dir={out_dir}", "--port=0",
                                         *SAMPLING_ARGS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env)
        line = self.process.stdout.readline()  # the server listens before it prints this
        match = re.search(r"on (http://127\.0\.0\.1:(\d+))", line)
        if not match:
            self.stop()
            raise AssertionError(f"serve.py did not start: {line!r} {self.process.stderr.read()}")
        self.url, self.port = match.group(1), int(match.group(2))
        self.out_dir, self.model_id = out_dir, os.path.basename(os.path.abspath(out_dir))

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.stderr.read()
