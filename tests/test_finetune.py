"""Fine-tuning on chat data (train.py --init_from=OUT_DIR on a prepare_chat.py folder): the loss counts
the assistant's tokens only (checked against log-softmax by hand), the vocabulary grows by the chat
tokens with their rows at the mean embedding and the checkpoint says so, resume is exact, and a
tokenizer that is neither the model's nor the model's plus the chat tokens is one line."""
import json
import math
import os
import random
import shutil
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import train
from conftest import PHRASES, REPO, TINY_MODEL_ARGS, assert_user_error, read_events, run_script
from model import GPT, GPTConfig
from opengpt.chat_format import CHAT_TOKENS
from opengpt.data import TokenData
from opengpt.run_setup import build_model
from opengpt.training import evaluate_split

BLOCK = 16


def write_conversations(path, n=300, seed=0):
    """Conversations that ask for the line after a phrase: a system prompt in every third."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a = rng.randrange(len(PHRASES) - 1)
            messages = ([{"role": "system", "content": "你是助手。"}] if i % 3 == 0 else []) + [
                {"role": "user", "content": f"{PHRASES[a]}，下一句？"},
                {"role": "assistant", "content": PHRASES[a + 1] + "。"}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def chat_data(tiny_bpe_data, tmp_path_factory):
    """A chat folder whose tokenizer is tiny_bpe_data's 300 tokens plus the two chat tokens."""
    root = tmp_path_factory.mktemp("chat_data")
    write_conversations(root / "chats.jsonl")
    result = run_script("prepare_chat.py", f"--input={root / 'chats.jsonl'}", f"--tokenizer_from={tiny_bpe_data}",
                        f"--out={root / 'chat'}", "--min_val_conversations=40")
    assert result.returncode == 0, result.stderr
    return root / "chat"


def run_args(data_dir, out_dir, *extra):
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_MODEL_ARGS, "--warmup_iters=2", "--eval_iters=2",
            "--learning_rate=1e-2", *extra]


@pytest.fixture(scope="module")
def base_run(tiny_bpe_data, tmp_path_factory):
    """A tiny model pretrained on tiny_bpe_data: what the fine-tuning starts from."""
    out = tmp_path_factory.mktemp("base_run")
    result = run_script("train.py", *run_args(tiny_bpe_data, out, "--max_iters=20", "--lr_decay_iters=20",
                                              "--eval_interval=20"))
    assert result.returncode == 0, result.stderr
    return out


def hand_masked_loss(logits, targets, mask):
    """Mean of -log softmax(logits)[target] over the positions whose mask is 1, written out:
    log-sum-exp from the row's maximum, in float64."""
    logits = logits.double()
    top = logits.max(dim=-1, keepdim=True).values
    log_probs = logits - (top + (logits - top).exp().sum(dim=-1, keepdim=True).log())
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum() / mask.sum(), -(picked * mask)


def test_a_chat_folder_s_batches_leave_out_all_but_the_assistant_s_tokens(chat_data):
    data = TokenData(str(chat_data), BLOCK)
    tokens = np.fromfile(chat_data / "val.bin", dtype=np.uint16).astype(np.int64)
    mask = np.fromfile(chat_data / "val_mask.bin", dtype=np.uint8)
    x, y, sources = next(data.eval_batches("val", 8, 1))
    for row, start in enumerate(range(0, 8 * BLOCK, BLOCK)):
        assert x[row].tolist() == tokens[start:start + BLOCK].tolist()
        wanted = np.where(mask[start + 1:start + 1 + BLOCK] == 1, tokens[start + 1:start + 1 + BLOCK], -1)
        assert y[row].tolist() == wanted.tolist()
    assert (y == -1).any() and (y != -1).any()
    xs, ys = data.train_micro_batches(torch.Generator().manual_seed(0), 4, 2, 0, 1)
    assert all(((y == -1) | (y >= 0)).all() for y in ys) and any((y == -1).any() for y in ys)


@pytest.mark.parametrize("chunked", [True, False])
def test_the_masked_loss_is_the_hand_computed_mean_over_the_assistant_s_tokens(chat_data, chunked):
    data = TokenData(str(chat_data), BLOCK)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=BLOCK, vocab_size=data.padded_vocab_size, dropout=0.0))
    model.chunked_head_loss = chunked
    tokens = np.fromfile(chat_data / "train.bin", dtype=np.uint16).astype(np.int64)
    mask = np.fromfile(chat_data / "train_mask.bin", dtype=np.uint8)
    starts = [0, 37, 500, 1234]
    x = torch.tensor(np.stack([tokens[s:s + BLOCK] for s in starts]))
    targets = torch.tensor(np.stack([tokens[s + 1:s + 1 + BLOCK] for s in starts]))
    learnt = torch.tensor(np.stack([mask[s + 1:s + 1 + BLOCK] for s in starts])).double()
    _, y = data._windows("train", starts)
    _, loss = model(x, y)
    with torch.no_grad():
        expected, _ = hand_masked_loss(model.full_logits(x), targets, learnt)
    assert 0 < learnt.sum() < learnt.numel()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_evaluation_reports_bits_per_character_of_the_assistant_s_text(chat_data):
    """Over every val window: bits per byte of the masked targets (<|im_end|> counts one byte), scaled
    by meta.json's bytes per character of the assistant's replies."""
    data = TokenData(str(chat_data), BLOCK)
    tokenizer = data.load_tokenizer()
    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=BLOCK, vocab_size=data.padded_vocab_size, dropout=0.0))
    model.eval()
    with torch.no_grad():
        val = evaluate_split(model, data, "val", 8, 0, "cpu", nullcontext(), torch.from_numpy(tokenizer.token_byte_lengths))
    tokens = np.fromfile(chat_data / "val.bin", dtype=np.uint16).astype(np.int64)
    mask = np.fromfile(chat_data / "val_mask.bin", dtype=np.uint8)
    starts = range(0, len(tokens) - BLOCK, BLOCK)
    x = torch.tensor(np.stack([tokens[s:s + BLOCK] for s in starts]))
    targets = torch.tensor(np.stack([tokens[s + 1:s + 1 + BLOCK] for s in starts]))
    learnt = torch.tensor(np.stack([mask[s + 1:s + 1 + BLOCK] for s in starts])).double()
    with torch.no_grad():
        mean_loss, losses = hand_masked_loss(model.full_logits(x), targets, learnt)
    im_end = tokenizer.special_token_id(CHAT_TOKENS[1])
    n_bytes = sum(1 if t == im_end else len(tokenizer.token_bytes[t])
                  for t, m in zip(targets.flatten().tolist(), learnt.flatten().tolist()) if m)
    split = json.loads((chat_data / "meta.json").read_text(encoding="utf-8"))["splits"]["val"]
    bits_per_byte = losses.sum().item() / math.log(2) / n_bytes
    assert val["tokens"] == int(learnt.sum())
    assert val["loss"] == pytest.approx(mean_loss.item(), rel=1e-6)
    assert val["bpb"] == pytest.approx(bits_per_byte, rel=1e-6)
    assert val["bpc"] == pytest.approx(bits_per_byte * (split["bytes"] + split["documents"]) /
                                       (split["characters"] + split["documents"]), rel=1e-6)


def test_fine_tuning_grows_the_vocabulary_with_rows_at_the_mean_embedding(base_run, chat_data):
    base = torch.load(base_run / "ckpt.pt", weights_only=True)
    data = TokenData(str(chat_data), BLOCK)
    cfg = train.DEFAULTS | {"init_from": str(base_run), "block_size": BLOCK, "dropout": 0.0}
    model, model_args, checkpoint, growth = build_model(cfg, data, str(chat_data), data.load_tokenizer())
    assert checkpoint is None  # the weights, not the run: no optimizer state
    assert growth == {"from": 300, "to": 302, "tokens": list(CHAT_TOKENS), "init": "mean"}
    old = base["model"]["lm_head.weight"]
    new = model.lm_head.weight.detach()
    assert model.transformer.wte.weight is model.lm_head.weight and model_args["vocab_size"] == new.size(0) == 320
    assert torch.equal(new[:300], old[:300]) and torch.equal(new[302:], old[302:])
    assert torch.allclose(new[300], old[:300].mean(dim=0)) and torch.equal(new[300], new[301])
    assert all(torch.equal(p, base["model"][name]) for name, p in model.state_dict().items() if "wte" not in name and "lm_head" not in name)


def test_vocabulary_growth_past_the_padding_adds_rows_at_the_mean():
    from opengpt.run_setup import grow_vocabulary
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, dropout=0.0))
    old = model.lm_head.weight.detach().clone()
    growth = grow_vocabulary(model, 64, list(CHAT_TOKENS), 128)
    new = model.lm_head.weight.detach()
    assert growth["to"] == 66 and new.shape == (128, 16) and model.config.vocab_size == 128
    assert torch.equal(new[:64], old) and torch.allclose(new[64:], old.mean(dim=0).expand(64, 16))
    assert model.transformer.wte.weight is model.lm_head.weight
    _, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.full((1, 8), 65))
    assert math.isfinite(loss.item())


def test_a_fine_tuning_records_the_chat_template_and_resumes_exactly(base_run, chat_data, tmp_path):
    """6 steps straight == 3 + resume + 3, loss for loss and weight for weight; dropout is on."""
    common = ["--dropout=0.1", "--lr_decay_iters=6", "--eval_interval=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = run_script("train.py", *run_args(chat_data, straight, *common, f"--init_from={base_run}", "--max_iters=6"))
    assert first.returncode == 0, first.stderr
    assert "vocabulary grown from 300 to 302 tokens" in first.stdout
    assert run_script("train.py", *run_args(chat_data, resumed, *common, f"--init_from={base_run}", "--max_iters=3")).returncode == 0
    result = run_script("train.py", *run_args(chat_data, resumed, *common, "--init_from=resume", "--max_iters=6"))
    assert result.returncode == 0, result.stderr

    def losses(out):
        return {e["iter"]: e["loss"] for e in read_events(out, "train")}
    assert losses(straight) == losses(resumed) and len(losses(straight)) == 6
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(resumed / "ckpt.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for saved in (a, b):
        assert saved["chat"] == {"template": "chatml", "vocab_growth": {"from": 300, "to": 302, "tokens": list(CHAT_TOKENS),
                                                                          "init": "mean"}}
        assert saved["tokenizer"]["json"] == (chat_data / "tokenizer.json").read_text(encoding="utf-8")
        assert saved["model_args"]["vocab_size"] == 320 and saved["iter_num"] == 6


def test_fine_tuning_on_data_of_another_tokenizer_is_one_line(base_run, tiny_data, tmp_path):
    result = run_script("train.py", *run_args(tiny_data, tmp_path / "out", f"--init_from={base_run}", "--max_iters=1"))
    assert_user_error(result, f"--init_from={base_run} was trained with the bpe tokenizer (300 tokens)",
                      "gpt2 tokens (50257)", f"prepare_chat.py --tokenizer_from={base_run}")
    assert not (tmp_path / "out").exists()


def test_fine_tuning_starts_from_an_export_too(base_run, chat_data, tmp_path):
    """export.py's transformers folder of the base run: the same growth, recorded the same way."""
    pytest.importorskip("transformers")
    export = tmp_path / "export"
    result = run_script("export.py", f"--out_dir={base_run}", f"--export_dir={export}")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "run"
    result = run_script("train.py", *run_args(chat_data, out, f"--init_from={export}", "--max_iters=3", "--lr_decay_iters=3",
                                              "--eval_interval=3"))
    assert result.returncode == 0, result.stderr
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["chat"]["vocab_growth"] == {"from": 300, "to": 302, "tokens": list(CHAT_TOKENS), "init": "mean"}


@pytest.mark.parametrize("damage, words", [
    (lambda folder: (folder / "val_mask.bin").unlink(), ["val_mask.bin not found, though meta.json says", "is a chat folder"]),
    (lambda folder: (folder / "val_mask.bin").write_bytes((folder / "val_mask.bin").read_bytes()[:-1]),
     ["mask bytes but val.bin", "rerun prepare_chat.py"]),
    (lambda folder: (folder / "train_mask.bin").write_bytes(b"\x02" + (folder / "train_mask.bin").read_bytes()[1:]),
     ["train_mask.bin holds the value 2, but a mask holds only 0 and 1"]),
])
def test_a_damaged_mask_file_is_one_line(chat_data, tmp_path, damage, words):
    folder = tmp_path / "chat"
    shutil.copytree(chat_data, folder)
    damage(folder)
    result = run_script("train.py", *run_args(folder, tmp_path / "out", "--max_iters=1"))
    assert_user_error(result, *words)


@pytest.mark.parametrize("optimizer", ["sophiag", "muon"])
def test_every_optimizer_fine_tunes_on_the_replies(base_run, chat_data, tmp_path, optimizer):
    """The same loop for every optimizer: SophiaG (its Hessian pass on the masked batches too) and Muon
    fine-tune the pretrained model on the replies; the reply loss goes down."""
    out = tmp_path / optimizer
    result = run_script("train.py", *run_args(chat_data, out, f"--init_from={base_run}", f"--optimizer={optimizer}",
                                              "--hess_interval=2", "--max_iters=8", "--lr_decay_iters=8", "--eval_interval=8",
                                              "--learning_rate=3e-3"))
    assert result.returncode == 0, result.stderr
    evals = read_events(out, "eval")
    assert [e["iter"] for e in evals] == [0, 8] and evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_two_processes_fine_tune_like_one_with_twice_the_accumulation(base_run, chat_data, tmp_path):
    """DDP on a chat folder: the masks travel with the windows each rank draws, so 2 processes x 1
    micro-batch reproduce 1 process x 2, loss for loss and weight for weight."""
    from test_ddp import TINY, Run, one_process, run_all, two_processes
    runs = {}
    for launch, accumulation in ((one_process, 2), (two_processes, 1)):
        run_dir = tmp_path / launch.__name__
        run_dir.mkdir()
        args = [os.path.join(REPO, "train.py"), *TINY, f"--data_dir={chat_data}", "--out_dir=out", f"--init_from={base_run}",
                "--optimizer=adamw", f"--gradient_accumulation_steps={accumulation}"]
        runs[launch.__name__] = Run(run_dir, run_all(launch(args), cwd=run_dir))
    one, two = runs["one_process"], runs["two_processes"]
    assert two.iters == one.iters == list(range(6))
    assert two.losses == pytest.approx(one.losses, rel=1e-6, abs=1e-5)
    for name, value in two.checkpoint["model"].items():
        torch.testing.assert_close(value, one.checkpoint["model"][name], rtol=1e-4, atol=1e-5)
