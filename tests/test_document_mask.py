"""--document_mask (model.document_layout): documents packed into one block, each closed by <|endoftext|>,
do not attend to each other and their positions restart, so the masked packed forward gives each document
the logits, loss and gradients of a forward of that document on its own (the reference: the model
without the mask, one document at a time). Off, the model takes SDPA's mask-free causal path, as before;
old checkpoints (no such key) load with it off; a resumed run cannot change it."""
import pytest
import torch
import torch.nn.functional as F

import train
from model import GPT, GPTConfig, document_layout, explicit_causal_attention
from opengpt import checkpoint as ckpt
from opengpt.cli import UserError
from opengpt.run_setup import check_resume_matches, model_args_from

EOT = 0
VOCAB = 64
# two rows: documents of 3, 5, 1 and 4 tokens, then one cut by the block's end; and two eots in a
# row (an empty document: the eot alone)
DOCUMENTS = [[[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15, 16, 17], [18, 19]],
             [[20, 21], [], [23, 24, 25, 26, 27, 28], [29, 30, 31, 32, 33, 34, 35, 36]]]


def packed(rows):
    """(B, T) ids: each row's documents back to back, every one but the last closed by EOT."""
    out = []
    for documents in rows:
        ids = [t for doc in documents[:-1] for t in (*doc, EOT)] + documents[-1]
        out.append(ids)
    assert len({len(ids) for ids in out}) == 1
    return torch.tensor(out)


def pieces(rows):
    """For each row, the (start, end) of each document in it, its closing EOT included."""
    spans = []
    for documents in rows:
        start, row = 0, []
        for i, doc in enumerate(documents):
            end = start + len(doc) + (i < len(documents) - 1)
            row.append((start, end))
            start = end
        spans.append(row)
    return spans


def tiny_model(rotary, document_mask=True, seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16, dropout=0.0, rotary=rotary,
                       document_mask=document_mask, eot_token=EOT)
    return GPT(config).eval()


def one_by_one_logits(model, idx, spans):
    """The reference: each document through the model without the mask, on its own, at positions 0, 1, ..."""
    model.config.document_mask = False
    try:
        return torch.stack([torch.cat([model.full_logits(idx[b:b + 1, start:end])[0] for start, end in row])
                            for b, row in enumerate(spans)])
    finally:
        model.config.document_mask = True


def test_document_layout_from_the_definition():
    idx = torch.tensor([[5, EOT, EOT, 7, 8, EOT, 9]])
    positions, allowed = document_layout(idx, EOT)
    documents = [0, 0, 1, 2, 2, 2, 3]  # the number of EOTs strictly before each token
    assert positions.tolist() == [[0, 1, 0, 0, 1, 2, 0]]
    expected = [[j <= i and documents[i] == documents[j] for j in range(7)] for i in range(7)]
    assert allowed.shape == (1, 1, 7, 7) and allowed[0, 0].tolist() == expected


@pytest.mark.parametrize("rotary", [False, True], ids=["learned", "rotary"])
def test_packed_masked_forward_is_each_document_on_its_own(rotary):
    model = tiny_model(rotary)
    idx = packed(DOCUMENTS)
    with torch.no_grad():
        masked = model.full_logits(idx)
        reference = one_by_one_logits(model, idx, pieces(DOCUMENTS))
    torch.testing.assert_close(masked, reference, rtol=1e-5, atol=1e-5)
    model.config.document_mask = False  # without the mask the later documents do see the earlier ones
    with torch.no_grad():
        assert not torch.allclose(model.full_logits(idx), reference, atol=1e-3)


@pytest.mark.parametrize("rotary", [False, True], ids=["learned", "rotary"])
def test_packed_masked_loss_and_gradients_are_each_document_on_its_own(rotary):
    idx = packed(DOCUMENTS)
    targets = torch.roll(idx, -1, dims=1)
    targets[0, 3] = -1  # an ignored target, as a chat folder's masked ones
    masked_model = tiny_model(rotary)
    _, loss = masked_model(idx, targets)  # the chunked head loss
    loss.backward()

    reference_model = tiny_model(rotary)
    logits = one_by_one_logits(reference_model, idx, pieces(DOCUMENTS))
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(masked_model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_explicit_attention_takes_the_document_mask_as_sdpa_does():
    # the path bfloat16 on a CPU takes at short blocks: checked in float32 against SDPA with the same mask
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 7, 8) for _ in range(3))
    _, allowed = document_layout(torch.tensor([[1, EOT, 2, 3, EOT, 4, 5], [EOT, EOT, 1, 2, 3, 4, 5]]), EOT)
    torch.testing.assert_close(explicit_causal_attention(q, k, v, 0.3, 0.0, allowed),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3))


def test_off_takes_the_mask_free_causal_path_and_ignores_eot(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = tiny_model(rotary=True, document_mask=False)
    idx = packed(DOCUMENTS)
    with torch.no_grad():
        logits = model.full_logits(idx)
        model.config.eot_token = 63  # no token in idx: the eots are plain tokens either way
        assert torch.equal(model.full_logits(idx), logits)
    assert calls and all(mask is None and causal for mask, causal in calls)


def test_cached_decoding_of_one_document_matches_the_masked_forward():
    # one conversation (no eot in it): the cache reads it as one document, as the masked forward does
    model = tiny_model(rotary=True)
    model.config.eot_token = VOCAB - 1  # never drawn (n_real_vocab), so the continuation stays one document
    prompt = torch.tensor([[5, 6, 7, 8]])
    generator = lambda: torch.Generator().manual_seed(0)
    cached = model.generate(prompt, 12, generator=generator(), use_cache=True, n_real_vocab=VOCAB - 1)
    uncached = model.generate(prompt, 12, generator=generator(), use_cache=False, n_real_vocab=VOCAB - 1)
    assert torch.equal(cached, uncached)


def test_a_checkpoint_without_the_key_loads_with_the_mask_off():
    model = tiny_model(rotary=False, document_mask=False)
    old_args = dict(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=16, dropout=0.0, rotary=False)
    loaded = ckpt.model_from({"model_args": old_args, "model": model.state_dict()})
    assert loaded.config.document_mask is False
    assert model_args_from(train.DEFAULTS, VOCAB)["document_mask"] is False


def test_a_resumed_run_cannot_change_the_mask():
    cfg = train.DEFAULTS | {"document_mask": True}
    checkpoint = {"model_args": model_args_from(train.DEFAULTS, VOCAB), "config": {}}
    with pytest.raises(UserError, match="--document_mask=False"):
        check_resume_matches(cfg, checkpoint, "out/ckpt.pt")


def test_eot_token_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="eot_token"):
        GPTConfig(vocab_size=64, eot_token=64)


def test_document_mask_speed_refuses_zero_timed_steps_in_one_line():
    from conftest import assert_user_error, run_script
    small = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=8", "--batch_size=2", "--warmup=0",
             "--device=cpu", "--dtype=float32", "--compile=False"]
    assert_user_error(run_script("logs/document_mask_speed.py", *small, "--iters=0"), "--iters=0 must be at least 1")
