"""Export a checkpoint as a transformers folder: model, generation settings and tokenizer. A model
with learned positions goes out as GPT-2 (below); a rotary one (--rotary=True, our default recipe)
as GPT-NeoX (gpt_neox_format.py), which also loads with AutoModelForCausalLM and pipeline().

    python export.py --out_dir=out-tiny-zh-cpu --export_dir=hf-tiny-zh
    python sample.py --init_from=hf-tiny-zh --start=滚滚长江      # and back, via GPT.from_pretrained

The folder loads offline with GPT2LMHeadModel / AutoTokenizer.from_pretrained(DIR) and
pipeline("text-generation", model=DIR). Our GPT is GPT-2's architecture under GPT-2's parameter
names, so the export is a copy with three differences handled here:
- nn.Linear stores (out, in); transformers' GPT-2 uses Conv1D, which stores (in, out): transpose.
- bias=False models have no biases; GPT-2 always has them, so they are written as zeros, which
  computes exactly what our bias-free layers compute.
- a padded vocabulary (50304 rows for 50257 tokens) is kept as is; generation_config.json
  suppresses the padding ids, as sample.py does with n_real_vocab.
The tokenizer is the checkpoint's own: a trained BPE's tokenizer.json goes out through
PreTrainedTokenizerFast; GPT-2's files (vocab.json, merges.txt, tokenizer.json) are rebuilt from
tiktoken's GPT-2 ranks, which tokenizer.py finds offline. No model hub is needed either way.
A chat model (fine-tuned, its tokenizer has <|im_start|> and <|im_end|>) also gets chat_format's
CHAT_TEMPLATE as tokenizer_config.json's chat_template, <|im_end|> as its eos_token and as a stop of
generation_config.json, so AutoTokenizer.apply_chat_template gives chat_format.prompt_ids's ids and
pipeline("text-generation") takes a list of messages and answers with the assistant's.
"""
import json
import os
import signal
import sys
from functools import lru_cache

import torch

from opengpt import checkpoint as ckpt
from opengpt import gpt_neox_format
from opengpt.chat_format import CHAT_TEMPLATE, IM_END, im_end_id, is_chat_tokenizer, prompt_ids
from opengpt.cli import UserError, run
from opengpt.folder_lock import lock_folder
from opengpt.run_setup import EARLIER_RUN_FILES
from opengpt.staged_folder import remove_stale_folders, staged_folder
from opengpt.files import fsync_file, space_left
from configurator import parse_args
from opengpt.tokenizer import EOT_TOKEN, bytes_to_unicode, find_gpt2_ranks, load_ranks

DEFAULTS = dict(
    out_dir="out",
    checkpoint_file=ckpt.FILENAME,  # or ckpt_best.pt, with train.py --keep_best_checkpoint=True
    export_dir="",  # default: <out_dir>-hf, next to the run's folder
    overwrite=False,  # replace a non-empty export_dir that is not an earlier export
)

# Written into every export: what produced it, and how the next export knows it may replace the folder.
PROVENANCE_FILE = "open_gpt_training_export.json"
EXPORT_FORMAT = "open-gpt-training-export/1"
# What an export wrote before PROVENANCE_FILE listed its files (older transformers also wrote the last two).
EARLIER_EXPORT_FILES = ("config.json", "generation_config.json", "merges.txt", "model.safetensors", PROVENANCE_FILE,
                        "tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json",
                        "added_tokens.json")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# sample.py's defaults, so pipeline("text-generation") samples as sample.py does rather than greedily.
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=200)
# Exercises the tokenizer's hard cases: contractions, digits, whitespace runs, Chinese, emoji.
CHECK_TEXT = "Hello world, it's 2024!  滚滚长江东逝水，浪花淘尽英雄。 🙂\n\n\tend  "
# A chat model's export must render this as chat_format does: a system prompt, turns, Chinese, emoji, spaces.
CHECK_CONVERSATION = [
    {"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "Hello 🙂, it's  me\n"},
    {"role": "assistant", "content": " 滚滚长江东逝水。"}, {"role": "user", "content": "浪花淘尽英雄？"},
]


def merge_parts(ranks, token, rank):
    """The two tokens whose merge made token: BPE on its bytes using only the merges learnt
    before it (lower ranks) stops with exactly two parts."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
        best_rank, i = min(pairs)
        if best_rank >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two earlier tokens")
    return parts


@lru_cache(maxsize=1)
def gpt2_vocab_and_merges():
    """vocab.json's dict and merges.txt's lines, from tiktoken's GPT-2 ranks (token bytes -> rank)."""
    ranks = load_ranks(find_gpt2_ranks())
    to_unicode = bytes_to_unicode()

    def text(token):
        return "".join(to_unicode[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = EOT_TOKEN
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            if rank != 256 + len(merges):
                raise ValueError(f"ranks are not 256 single bytes followed by merges (token {token!r} has rank {rank})")
            merges.append(" ".join(text(part) for part in merge_parts(ranks, token, rank)))
    return vocab, merges


def save_tokenizer(tokenizer, model_max_length, folder):
    """The checkpoint's tokenizer as transformers files, so AutoTokenizer.from_pretrained(folder)
    gives our ids. A trained BPE: its tokenizer.json through PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    if tokenizer.kind == "gpt2":
        save_gpt2_tokenizer(model_max_length, folder)
        return
    eot = tokenizer.hf.id_to_token(tokenizer.eot_token)
    # a chat model's turn ends at <|im_end|>: transformers stops there and pads with <|endoftext|>
    special = dict(eos_token=eot)
    if is_chat_tokenizer(tokenizer):
        special = dict(eos_token=IM_END, pad_token=eot, chat_template=CHAT_TEMPLATE)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(tokenizer.json_text),
                                           model_max_length=model_max_length, bos_token=eot, **special)
    # the template inside tokenizer_config.json, where every transformers version looks (newer ones
    # would write it to a chat_template.jinja of its own, which older ones do not read)
    hf_tokenizer.save_pretrained(folder, save_jinja_files=False)


def save_gpt2_tokenizer(model_max_length, folder):
    """GPT-2's tokenizer files: vocab.json and merges.txt from the ranks, then transformers' own
    files (tokenizer.json, tokenizer_config.json) by loading and saving them with GPT2TokenizerFast."""
    from transformers import GPT2TokenizerFast

    vocab, merges = gpt2_vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    hf_tokenizer = GPT2TokenizerFast.from_pretrained(folder, model_max_length=model_max_length, trust_remote_code=False)
    hf_tokenizer.save_pretrained(folder)


def gpt2_config(config, eot_token):
    """transformers' GPT2Config for our GPTConfig."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, n_inner=4 * config.n_embd,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        activation_function=config.activation,  # model.ACTIVATIONS go by transformers' names
        layer_norm_epsilon=1e-5,  # nn.LayerNorm's default
        # The dropout the model was trained with: it does nothing in eval mode, and fine-tuning the
        # export with transformers then regularises as our training did.
        resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout,
        bos_token_id=eot_token, eos_token_id=eot_token, tie_word_embeddings=True,
    )


def gpt2_lm_head_model(model, tokenizer):
    """A transformers GPT2LMHeadModel computing what our GPT computes."""
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel(gpt2_config(model.config, tokenizer.eot_token))
    ours = model.state_dict()
    copied = set()
    with torch.no_grad():
        for key, param in hf_model.named_parameters():  # lm_head.weight is tied to wte, so not listed
            if key in ours:
                value = ours[key].t() if key.endswith(CONV1D_WEIGHTS) else ours[key]
                copied.add(key)
            elif key.endswith(".bias") and not model.config.bias:
                value = torch.zeros_like(param)
            else:
                raise KeyError(f"transformers' GPT-2 has {key}, which our GPT lacks")
            param.copy_(value)
    left_over = set(ours) - copied - {"lm_head.weight"}
    assert not left_over, f"weights not exported: {sorted(left_over)[:3]}"
    hf_model.generation_config = generation_config(model, tokenizer)
    return hf_model.eval()


def generation_config(model, tokenizer):
    from transformers import GenerationConfig

    # a chat model ends its turn with <|im_end|> (and may end the document)
    eos = [im_end_id(tokenizer), tokenizer.eot_token] if is_chat_tokenizer(tokenizer) else tokenizer.eot_token
    return GenerationConfig(
        bos_token_id=tokenizer.eot_token, eos_token_id=eos, pad_token_id=tokenizer.eot_token,
        suppress_tokens=list(range(tokenizer.n_vocab, model.config.vocab_size)) or None, **SAMPLING,
    )


def gpt_neox_model(model, tokenizer):
    """A transformers GPTNeoXForCausalLM computing what our rotary GPT computes (gpt_neox_format.py)."""
    hf_model = gpt_neox_format.to_neox(model, tokenizer.eot_token)
    hf_model.generation_config = generation_config(model, tokenizer)
    return hf_model.eval()


def save_provenance(folder, checkpoint_path, checkpoint):
    """The record of what produced the export, written last: its `files` are everything the export
    wrote, which is all a later export may replace without --overwrite."""
    import transformers

    record = dict(
        format=EXPORT_FORMAT, checkpoint=os.path.abspath(checkpoint_path), iter_num=checkpoint.get("iter_num"),
        best_val_loss=checkpoint.get("best_val_loss"), model_args=checkpoint["model_args"],
        training_config=checkpoint.get("config"),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__),
        files=sorted(set(os.listdir(folder)) | {PROVENANCE_FILE}),
    )
    with open(os.path.join(folder, PROVENANCE_FILE), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, ensure_ascii=False, default=str)


def verify_export(model, tokenizer, folder):
    """Load the folder as a user would and check it against our model and tokenizer. A mismatch is
    a bug in this file, so it is loud, and the folder is never put in place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.path.isfile(os.path.join(folder, "model.safetensors")), "save_pretrained wrote no model.safetensors"
    ids = tokenizer.encode(CHECK_TEXT)
    hf_tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    hf_ids = hf_tokenizer(CHECK_TEXT)["input_ids"]
    assert hf_ids == ids, f"exported tokenizer gives {hf_ids}, ours gives {ids}"
    if is_chat_tokenizer(tokenizer):
        ours = prompt_ids(tokenizer, CHECK_CONVERSATION)
        theirs = hf_tokenizer.apply_chat_template(CHECK_CONVERSATION, add_generation_prompt=True, tokenize=True)
        theirs = theirs if isinstance(theirs, list) else theirs["input_ids"]  # transformers 5 gives a BatchEncoding
        assert theirs == ours, f"exported chat template gives {theirs}, chat_format gives {ours}"
    hf_model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False).eval()
    idx = torch.tensor([ids[:model.config.block_size]])
    with torch.no_grad():
        ours, theirs = model.full_logits(idx), hf_model(idx).logits
    difference = (ours - theirs).abs().max().item()
    assert difference <= 1e-4 * (1 + ours.abs().max().item()), f"exported logits differ from ours by {difference}"


def files_of_earlier_export(folder):
    """The names an earlier export wrote into folder, or None if folder is not an export."""
    try:
        with open(os.path.join(folder, PROVENANCE_FILE), encoding="utf-8") as f:
            record = json.load(f)
        if record.get("format") != EXPORT_FORMAT:
            return None
        return set(record.get("files") or EARLIER_EXPORT_FILES)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def check_export_dir(export_dir, checkpoint_path, overwrite):
    """Refuse, before any slow work, to write where the user would lose something. A symlinked
    export_dir is judged (and replaced) where it points."""
    target = os.path.realpath(export_dir)
    if os.path.realpath(checkpoint_path).startswith(target + os.sep):
        raise UserError(f"--export_dir={export_dir} holds the checkpoint {checkpoint_path}; choose another folder")
    for what, folder in (("the current folder", os.getcwd()), ("your home folder", os.path.expanduser("~"))):
        folder = os.path.realpath(folder)
        if folder == target or folder.startswith(target.rstrip(os.sep) + os.sep):  # "/" holds everything
            raise UserError(f"--export_dir={export_dir} {'is' if folder == target else 'holds'} {what}; export.py "
                            f"replaces the whole folder, even with --overwrite=True: give a new one, e.g. --export_dir=hf-mine")
    if os.path.ismount(target):  # a rename cannot move it: the swap would fail once the export is written
        raise UserError(f"--export_dir={export_dir} is a mount point, which export.py would replace whole; give a folder "
                        f"inside it, e.g. --export_dir={os.path.join(export_dir, 'hf-mine')}")
    if os.path.islink(export_dir) and not os.path.exists(export_dir):
        raise UserError(f"--export_dir={export_dir} is a link to {os.readlink(export_dir)}, which does not exist; "
                        f"create that folder or choose another")
    if not os.path.lexists(export_dir):
        return
    if not os.path.isdir(export_dir):
        raise UserError(f"--export_dir={export_dir} exists and is not a folder")
    entries = os.listdir(export_dir)
    folders = sorted(name for name in entries if os.path.isdir(os.path.join(export_dir, name)))
    if folders:  # an export is flat: a folder inside is someone's data (a data/ holding data/mine), not ours to replace
        raise UserError(f"--export_dir={export_dir} holds folders ({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''}), "
                        f"which an export never writes; export.py replaces the whole folder, even with --overwrite=True: "
                        f"give a new one, e.g. --export_dir=hf-mine")
    precious = sorted(set(entries) & {*EARLIER_RUN_FILES, "meta.json", "train.bin", "val.bin"})
    if precious:  # a run's out_dir or a data folder (--out_dir and --export_dir swapped, say)
        raise UserError(f"--export_dir={export_dir} holds a training run or its data ({', '.join(precious)}), which an "
                        f"export never writes; export.py replaces the whole folder, even with --overwrite=True: "
                        f"give a new one, e.g. --export_dir=hf-mine")
    if not entries or overwrite:
        return
    written = files_of_earlier_export(export_dir)
    if written is None:
        raise UserError(f"--export_dir={export_dir} is not empty and not an earlier export (no {PROVENANCE_FILE}); "
                        f"choose another folder or pass --overwrite=True to replace it")
    added = sorted(set(entries) - written)
    if added:  # replacing the folder would delete them
        raise UserError(f"--export_dir={export_dir} is an earlier export that also holds files it did not write "
                        f"({', '.join(added[:3])}{', ...' if len(added) > 3 else ''}); move them out, or pass "
                        f"--overwrite=True to replace the folder, them included")


def write_folder_atomically(path, write):
    """Call write(folder) on a new folder beside path, then swap it in whole, as prepare.py does
    (staged_folder.py): an error, Ctrl-C or SIGTERM leaves path whole (the earlier folder, or once
    swapped the new one), and what a kill -9 left (path missing, its old folder hidden) the next
    export puts right. Under the folder's lock, so two exports never take each other's folders for a
    dead run's."""
    with lock_folder(path, "export.py"):
        remove_stale_folders(path)
        with staged_folder(path) as stage:
            write(stage)
            umask = os.umask(0)
            os.umask(umask)
            for entry in os.scandir(stage):
                os.chmod(entry.path, 0o666 & ~umask)  # as any new file: transformers writes its weights at 0600
                fsync_file(entry.path)  # on disk before the rename makes them visible


def is_write_failure(error):
    """A full or read-only disk, as Python, safetensors (Rust: "os error 28") or tokenizers report it."""
    return isinstance(error, OSError) or "os error" in str(error) or "I/O error" in str(error)


def stop(signum, frame):
    raise KeyboardInterrupt  # a kill (SIGTERM) stops the export as Ctrl-C does: the unfinished folder is removed


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    signal.signal(signal.SIGTERM, stop)
    if not cfg["out_dir"]:
        raise UserError("--out_dir is empty; name the training run's folder, e.g. --out_dir=out")
    export_dir = cfg["export_dir"] or os.path.abspath(cfg["out_dir"]) + "-hf"
    checkpoint_path = os.path.join(cfg["out_dir"], cfg["checkpoint_file"])
    check_export_dir(export_dir, checkpoint_path, cfg["overwrite"])
    checkpoint = ckpt.load(checkpoint_path)
    ckpt.check_finite_weights(checkpoint, checkpoint_path)
    model = ckpt.model_from(checkpoint)
    model.eval()
    tokenizer = ckpt.tokenizer_of(checkpoint)
    ckpt.check_vocabulary_fits(model, tokenizer)
    try:
        import transformers
    except ImportError:
        raise UserError("export needs transformers: pip install transformers safetensors") from None
    # Its progress bars and loading notes describe our own temporary files, not the user's business.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    def write(folder):
        # again, under the lock: the folder may have changed since (a killed export's put back in place)
        check_export_dir(export_dir, checkpoint_path, cfg["overwrite"])
        to_transformers = gpt_neox_model if model.config.rotary else gpt2_lm_head_model
        to_transformers(model, tokenizer).save_pretrained(folder)
        save_tokenizer(tokenizer, model.config.block_size, folder)
        save_provenance(folder, checkpoint_path, checkpoint)
        verify_export(model, tokenizer, folder)

    try:
        # a symlinked export_dir keeps its link: the folder it points at is the one replaced
        write_folder_atomically(os.path.realpath(export_dir), write)
    except Exception as e:
        if not is_write_failure(e):
            raise  # a bug here (verify_export's checks included) stays loud
        if isinstance(e, OSError) and e.strerror:
            reason = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        else:
            reason = (str(e).strip().splitlines() or ["?"])[0][:200]
        if "No space left" in reason:
            reason += f"; {space_left(export_dir)}"
        raise UserError(f"could not write the export to {export_dir} ({reason}); nothing there was replaced") from None
    if model.config.document_mask:  # transformers' GPT-2 and GPT-NeoX have no such mask: say where they differ
        print(f"note: {checkpoint_path} was trained with --document_mask=True; the export attends across "
              f"its end-of-text token, so it gives our logits for an input of one document (a chat "
              f"prompt), not for several packed in one", file=sys.stderr)
    chat = " (a chat model: give the pipeline a list of messages)" if is_chat_tokenizer(tokenizer) else ""
    print(f"exported {checkpoint_path} (iter {checkpoint.get('iter_num')}) to {export_dir}; load it with "
          f"transformers' from_pretrained, pipeline('text-generation', model={export_dir!r}){chat}, "
          f"or python sample.py --init_from={export_dir}")


if __name__ == "__main__":
    run(main)
