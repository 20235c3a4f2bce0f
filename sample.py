"""Sample text from a trained model, or from GPT-2 weights.

    python sample.py --out_dir=out-tiny-zh-cpu --start=滚滚长江 --max_new_tokens=100
    python sample.py --out_dir=out --start=FILE:prompt.txt
    python sample.py --init_from=gpt2-xl --start="Hello"      # transformers hub name or folder
"""
import codecs
import os
import sys
import time

import torch

from opengpt import checkpoint as ckpt
from opengpt import hardware
from opengpt.chat_model import check_sampling_options
from opengpt.cli import UserError, run
from opengpt.decode import sampling_dtype
from opengpt.training import fits_in_memory
from configurator import parse_args

DEFAULTS = dict(
    init_from="resume",  # resume (the checkpoint in out_dir) | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | a folder
    out_dir="out",
    start="",  # prompt text, or FILE:path to read it from a file; empty starts a new document
    num_samples=3,
    max_new_tokens=256,
    temperature=0.8,  # 0 = greedy
    top_k=200,  # 0 = no top-k filtering
    seed=1337,
    device="auto",
    dtype="auto",
    compile=False,  # compile the prompt's forward and the one-token step (on a CPU once per machine, ~15 s), then faster tokens
    use_kv_cache=True,
)


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    if os.path.isdir(path):
        raise UserError(f"--start=FILE:{path} is a folder; give a text file")
    if not os.path.exists(path):
        raise UserError(f"prompt file {path} not found (from --start=FILE:{path})")
    if not os.path.isfile(path):  # a pipe would wait, a device never end
        raise UserError(f"prompt file {path} is not a regular file (a pipe or a device); give a text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text (bad byte at offset {e.start})") from None


def decode_clean(tokenizer, tokens):
    """Text of the tokens, a new line at each document end. A Chinese character can be split across
    byte-level tokens; decoding the bytes as a whole joins it again. Byte sequences that are not
    UTF-8 at all (an undertrained model makes them) and an incomplete character at the very end are
    dropped, never shown as U+FFFD."""
    table = tokenizer.token_bytes
    data = b"".join(b"\n" if t == tokenizer.eot_token else table[t] for t in tokens)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    return decoder.decode(data, final=False)  # holds back only a trailing incomplete character


def load_model(cfg):
    """(model, tokenizer): a checkpoint carries its tokenizer; transformers weights use their folder's."""
    if cfg["init_from"] == "resume":
        _, model, tokenizer = ckpt.load_trained(os.path.join(cfg["out_dir"], ckpt.FILENAME))
    elif cfg["init_from"] == "scratch" or ckpt.is_run_folder(cfg["init_from"]):
        run_dir = cfg["out_dir"] if cfg["init_from"] == "scratch" else cfg["init_from"]
        raise UserError(f"--init_from={cfg['init_from']} has no weights to sample from here: a run's checkpoint is "
                        f"sampled with --out_dir={run_dir} (--init_from=resume, the default)")
    else:
        model, tokenizer = ckpt.gpt2_model(cfg["init_from"], dropout=0.0), ckpt.pretrained_tokenizer(cfg["init_from"])
        ckpt.check_vocabulary_fits(model, tokenizer)
    return model, tokenizer


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    if cfg["num_samples"] <= 0:
        raise UserError(f"--num_samples must be positive, got {cfg['num_samples']}")
    check_sampling_options(cfg)
    device = hardware.pick_device(cfg["device"])
    dtype = sampling_dtype(cfg["dtype"], device)
    prompt = read_prompt(cfg["start"])
    model, tokenizer = load_model(cfg)
    model.eval().to(device)
    if cfg["compile"]:
        hardware.check_compile_works(device)
        # The prompt's forward, and each token's once the sequence outgrows the block, go through the
        # modules: compiled with dynamic shapes, one compile for all lengths. Within the block a token takes
        # opengpt/decode.py's one-token step, compiled apart (generate's compiled=True).
        model.hidden_states = torch.compile(model.hidden_states, dynamic=True)
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_token]
    block = model.config.block_size
    if len(prompt_ids) > block:
        print(f"note: the prompt has {len(prompt_ids)} tokens; the model sees only the last {block}", file=sys.stderr)
    x = torch.tensor(prompt_ids, dtype=torch.long, device=device)[None, :]
    generator = torch.Generator(device=device).manual_seed(cfg["seed"])
    with (torch.no_grad(), hardware.autocast_context(device, dtype),
          fits_in_memory(f"{cfg['max_new_tokens']:,} new tokens", device, "use a smaller --max_new_tokens")):
        for _ in range(cfg["num_samples"]):
            hardware.synchronize(device)
            started = time.perf_counter()
            y = model.generate(x, cfg["max_new_tokens"], temperature=cfg["temperature"], top_k=cfg["top_k"] or None,
                               generator=generator, use_cache=cfg["use_kv_cache"], n_real_vocab=tokenizer.n_vocab,
                               compiled=cfg["compile"])
            hardware.synchronize(device)
            seconds = time.perf_counter() - started
            print(decode_clean(tokenizer, y[0].tolist()))
            print("---------------")
            # on stderr, so that stdout stays the text alone
            print(f"({cfg['max_new_tokens']} new tokens in {seconds:.2f} s: {cfg['max_new_tokens'] / seconds:,.0f} tokens/s, "
                  f"KV cache {'on' if cfg['use_kv_cache'] else 'off'}, {dtype})", file=sys.stderr)


if __name__ == "__main__":
    run(main)
