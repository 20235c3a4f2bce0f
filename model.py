"""The GPT language model: config, blocks, loss, GPT-2 weight loading, MFU, generation.

Follows nanoGPT's model.py (itself GPT-2), with two additions: the loss goes through
head_loss.linear_cross_entropy so the full logits are never materialised, and generation keeps a
KV cache. Two options depart from GPT-2 for our CPU recipe, which measured them better (see
logs/README.md#tuning-the-cpu-recipe): rotary positions instead of learned ones, and ReLU squared
instead of GELU (GPT-2's weights load with neither; export.py writes a rotary model as GPT-NeoX).
Unlike nanoGPT's, it builds no optimizer: optimizers.py does (parameter groups included).
"""
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from opengpt.head_loss import chunk_rows_for, linear_cross_entropy, linear_cross_entropy_and_sampled, sampled_label_cross_entropy


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for GPU efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    scale_attn_by_inverse_layer_idx: bool = False  # attention logits / (layer index + 1), as in the Sophia authors' medium/large runs
    rotary: bool = False  # rotary position embeddings (Su et al. 2021) on queries and keys instead of GPT-2's learned wpe
    activation: str = "gelu_new"  # the MLP's, by transformers' names: GPT-2's tanh GELU, or relu2 (ReLU squared, So et al. 2021)
    document_mask: bool = False  # attend within a document only (packed conversations do not see each other); see document_layout
    eot_token: int = 0  # <|endoftext|>'s id, the token that closes a document (our BPE's 0, GPT-2's 50256)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if not 0 <= self.eot_token < self.vocab_size:
            raise ValueError(f"eot_token must be an id below vocab_size={self.vocab_size}, got {self.eot_token}")


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.scale = (config.n_embd // config.n_head) ** -0.5
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1  # a stability trick for deep models (transformers' GPT-2 has it too)

    def forward(self, x, kv_cache=None, rotation=None, allowed=None):
        """allowed: None (causal attention), or a boolean (B, 1, T, T) of the keys each query may see (document_layout)."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rotation is not None:
            q, k = rotate(q, *rotation), rotate(k, *rotation)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        # With a cache, the T new queries sit at the end of the sequence, so the causal mask is the
        # bottom-right block; SDPA's is_causal means top-left, so pass an explicit mask then.
        mask = allowed
        if kv_cache is not None and T > 1:
            mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(k.size(2) - T)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is None and explicit_attention_pays(q):
            y = explicit_causal_attention(q, k, v, self.scale, dropout_p, allowed)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(mask is None and kv_cache is None),
                                               dropout_p=dropout_p, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


# PyTorch's CPU flash-attention kernel is slow in bfloat16 at short blocks, where the explicit product
# wins; past a few hundred tokens its (T, T) scores cost memory (see logs/README.md#attention-on-a-cpu).
EXPLICIT_ATTENTION_MAX_BLOCK = 512


def explicit_attention_pays(q):
    """Whether explicit_causal_attention beats SDPA here: bfloat16 on a CPU at a short block."""
    if q.device.type != "cpu" or q.size(2) > EXPLICIT_ATTENTION_MAX_BLOCK:
        return False
    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return autocast_bf16 or q.dtype == torch.bfloat16


def explicit_causal_attention(q, k, v, scale, dropout_p, allowed=None):
    """softmax(q k^T * scale + causal mask) v, as nanoGPT wrote it before SDPA (dropout on the weights,
    as SDPA's dropout_p). allowed, if given, replaces the causal mask: the keys each query may see."""
    T = q.size(2)
    scores = (q @ k.transpose(-2, -1)) * scale
    hidden = ~allowed if allowed is not None else torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    weights = F.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1)
    weights = F.dropout(weights, dropout_p) if dropout_p else weights
    return weights.to(v.dtype) @ v


ACTIVATIONS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu2": lambda x: F.relu(x).square()}


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = ACTIVATIONS[config.activation]

    def forward(self, x):
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, rotation=None, allowed=None):
        x = x + self.attn(self.ln_1(x), kv_cache, rotation, allowed)
        return x + self.mlp(self.ln_2(x))


ROTARY_BASE = 10000.0  # the wavelengths of rotary embeddings grow from 2 pi to 2 pi * ROTARY_BASE


def rotation_angles(positions, head_dim, base=ROTARY_BASE):
    """(cos, sin), each (*positions.shape, head_dim / 2): position p turns pair i of a query or key by p * base^(-2i / head_dim)."""
    inverse_frequencies = base ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inverse_frequencies
    return angles.cos(), angles.sin()


def rotate(x, cos, sin):
    """Rotary position embedding of x (B, H, T, head_dim): its first and second halves are the pairs
    (GPT-NeoX's layout), each turned by its angle, so q . k depends on positions only by their offset."""
    first, second = x.float().chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1).to(x.dtype)


def document_layout(idx, eot_token):
    """(positions (B, T), allowed (B, 1, T, T)) of the documents packed in idx (B, T): a token's document
    is the number of eot_tokens before it (the eot closes its own document), its position counts from
    its document's first token, and it may attend to the earlier tokens of its document only, so each
    document is computed as if it stood alone at the start of a block (what inference of one conversation sees)."""
    T = idx.size(1)
    is_eot = idx == eot_token
    document = is_eot.cumsum(dim=1) - is_eot.long()
    index = torch.arange(T, device=idx.device)
    # a document starts after each eot: the latest such start at or before a token is its document's first
    starts = torch.where(F.pad(is_eot[:, :-1], (1, 0)), index, 0).cummax(dim=1).values
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    allowed = causal & (document[:, :, None] == document[:, None, :])
    return index - starts, allowed.unsqueeze(1)


class LayerKVCache:
    """Keys and values of one layer for the tokens seen so far, in a preallocated buffer."""

    def __init__(self, batch, n_head, max_len, head_dim, device, dtype):
        self.k = torch.empty(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k, v):
        end = self.length + k.size(2)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({} if config.rotary else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        # False: the plain reference path, nanoGPT's full (B, T, vocab) logits and F.cross_entropy
        self.chunked_head_loss = True
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: std 0.02/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count; the position embedding is left out by default, as nanoGPT does (the
        token embedding is shared with the head, so it counts)."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.rotary:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def hidden_states(self, idx, kv_caches=None):
        """Final-layer-norm output, (B, T, n_embd). With caches, positions continue after them.
        With config.document_mask, each document in idx sees only itself (document_layout); with
        caches, what they hold and idx are one document (a conversation being continued)."""
        B, T = idx.size()
        start = kv_caches[0].length if kv_caches is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        allowed = None
        if self.config.document_mask and kv_caches is None:
            pos, allowed = document_layout(idx, self.config.eot_token)  # positions (B, T), one row per sequence
        rotation = None
        if self.config.rotary:
            x = self.transformer.wte(idx)
            cos, sin = rotation_angles(pos, self.config.n_embd // self.config.n_head)
            rotation = (cos, sin) if pos.dim() == 1 else (cos.unsqueeze(1), sin.unsqueeze(1))  # (B, 1 head, T, D / 2)
        else:
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_caches[i] if kv_caches is not None else None, rotation, allowed)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, sample_labels_from_vocab=0, label_generator=None):
        """With targets: (None, mean loss), the loss computed without the full logits.
        With sample_labels_from_vocab=V: (None, mean loss on labels drawn with label_generator from
        the model's own softmax over the first V tokens), the Gauss-Newton-Bartlett loss whose
        gradient SophiaG's Hessian update needs (Liu et al. 2023, Alg. 2). It goes through forward
        so that DDP syncs it.
        With both: (None, mean loss on targets, mean loss on labels drawn for the positions whose target
        counts), from one forward: SophiaG's Hessian estimate on a training step's own windows.
        Otherwise: (logits of the last position, (B, 1, vocab), None), what generation needs."""
        x = self.hidden_states(idx)
        weight = self.lm_head.weight
        if sample_labels_from_vocab and targets is not None:
            loss, sampled_loss, _ = linear_cross_entropy_and_sampled(x.flatten(0, 1), weight, targets.flatten(),
                                                                     sample_labels_from_vocab, label_generator)
            return None, loss, sampled_loss
        if sample_labels_from_vocab:
            loss, _ = sampled_label_cross_entropy(x.flatten(0, 1), weight, sample_labels_from_vocab, label_generator)
            return None, loss
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        if not self.chunked_head_loss:
            return None, F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten(), ignore_index=-1)
        return None, linear_cross_entropy(x.flatten(0, 1), weight, targets.flatten())

    def full_logits(self, idx):
        """Logits at every position, (B, T, vocab); for tests and export checks."""
        return self.lm_head(self.hidden_states(idx))

    def token_losses(self, idx, targets):
        """The loss of each target, (B, T) float32, 0 where the target is -1 (ignored): evaluation
        counts them by source and by byte. The head runs a chunk of rows at a time, as the loss does."""
        x = self.hidden_states(idx).flatten(0, 1)
        flat_targets = targets.flatten()
        rows = chunk_rows_for(x.size(0), self.config.vocab_size)
        losses = [F.cross_entropy(self.lm_head(x[i:i + rows]).float(), flat_targets[i:i + rows], ignore_index=-1, reduction="none")
                  for i in range(0, x.size(0), rows)]
        return torch.cat(losses).view_as(targets)

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. GPT-2's 1024) for a smaller model."""
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} exceeds the model's {self.config.block_size}")
        self.config.block_size = block_size
        if self.config.rotary:
            return
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_dir, dropout=0.0):
        """A GPT with the weights of a transformers GPT2LMHeadModel: a hub name ('gpt2', ...,
        downloaded when online) or a local directory; or of a GPT-NeoX folder that export.py wrote
        from a rotary GPT (gpt_neox_format.py)."""
        from transformers import AutoConfig, GPT2LMHeadModel

        if os.path.isdir(name_or_dir) and AutoConfig.from_pretrained(name_or_dir, trust_remote_code=False).model_type == "gpt_neox":
            return cls._from_gpt_neox(name_or_dir, dropout)

        hf_model, loading = _load_quietly(GPT2LMHeadModel, name_or_dir)
        # transformers fills weights a folder lacks (a foreign model's, say BERT's) with random values
        not_loaded = [k for k in loading["missing_keys"] if not k.endswith((".attn.masked_bias", ".attn.bias", "lm_head.weight"))]
        if not_loaded:
            raise ValueError(f"{name_or_dir} is not a GPT-2 model: it has no weights for {not_loaded[:3]}")
        hf_config = hf_model.config
        # settings that change the maths our GPT does not follow: they would load into a different model
        ours_too = dict(tie_word_embeddings=True, scale_attn_weights=True, layer_norm_epsilon=1e-5)
        settings = {key: getattr(hf_config, key, wanted) for key, wanted in ours_too.items()}
        differing = {key: value for key, value in settings.items() if value != ours_too[key]}
        if differing:
            raise ValueError(f"{name_or_dir}'s config.json sets {', '.join(f'{k}={v}' for k, v in differing.items())}; "
                             f"only GPT-2's own ({', '.join(f'{k}={v}' for k, v in ours_too.items())}) load")
        config = GPTConfig(
            block_size=hf_config.n_positions, vocab_size=hf_config.vocab_size, n_layer=hf_config.n_layer,
            n_head=hf_config.n_head, n_embd=hf_config.n_embd, dropout=dropout, bias=True,
            scale_attn_by_inverse_layer_idx=bool(getattr(hf_config, "scale_attn_by_inverse_layer_idx", False)),
            activation=hf_config.activation_function,  # GPT-2's own is gelu_new; another one we lack is a ValueError
        )
        model = cls(config)
        ours = model.state_dict()
        theirs = hf_model.state_dict()
        # transformers' GPT-2 uses Conv1D modules, whose weights are the transpose of nn.Linear's.
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for key, value in theirs.items():
            if key.endswith((".attn.masked_bias", ".attn.bias")) or key not in ours:
                continue
            value = value.t() if key.endswith(transposed) else value
            if value.shape != ours[key].shape:
                raise ValueError(f"{name_or_dir}: {key} has shape {tuple(value.shape)}, expected {tuple(ours[key].shape)}")
            with torch.no_grad():
                ours[key].copy_(value)
        missing = [k for k in ours if k not in theirs and k != "lm_head.weight"]
        if missing:
            raise ValueError(f"{name_or_dir}: weights missing for {missing[:3]}")
        return model

    @classmethod
    def _from_gpt_neox(cls, folder, dropout):
        from opengpt import gpt_neox_format
        from transformers import GPTNeoXForCausalLM

        hf_model, loading = _load_quietly(GPTNeoXForCausalLM, folder)
        if not gpt_neox_format.is_ours(hf_model.config):
            raise ValueError(f"{folder} is a GPT-NeoX model of another shape (parallel residuals, partial rotation, "
                             f"another activation or LayerNorm epsilon): only GPT-2's blocks with rotary positions load")
        # a folder missing weights (a truncated copy, say) would otherwise load with random ones in their place
        not_loaded = [k for k in loading["missing_keys"] if not k.startswith(("embed_out.", "lm_head."))]  # the tied head
        if not_loaded:
            raise ValueError(f"{folder}: weights missing for {not_loaded[:3]}")
        return gpt_neox_format.from_neox(hf_model, cls, dropout)

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the matmuls plus attention (PaLM appendix B)."""
        cfg = self.config
        return 6 * self.get_num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True,
                 n_real_vocab=None, compiled=False):
        """Continue idx (B, T) by max_new_tokens tokens.

        With use_cache, keys and values are kept while the sequence fits the block; once it is
        longer, every step reruns the last block_size tokens, exactly as without the cache
        (positions are absolute, so a sliding window cannot reuse cached keys). In float32 both
        paths give the same tokens for the same generator; in 16 bits their kernels round
        differently and the tokens may part (sample.py samples in float32 on CPUs). n_real_vocab
        keeps the padding rows of a padded vocabulary from ever being drawn. Each cached token takes
        opengpt/decode.py's one-token step, the blocks' forward without the modules' per-call overhead;
        compiled=True runs that step compiled (AOTInductor on a CPU, torch.compile elsewhere).
        """
        from opengpt.decode import CachedDecoding, draw, head_columns  # decode.py imports this module

        block = self.config.block_size
        B, T = idx.size()
        out = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)
        out[:, :T] = idx
        decoding = CachedDecoding(self, B, idx.device, compiled) if use_cache else None
        head = decoding.head if decoding else head_columns(self)
        for length in range(T, T + max_new_tokens):
            if use_cache and length <= block:
                logits = decoding.prefill(idx) if length == T else decoding.step(out[:, length - 1])
            else:
                logits = self.hidden_states(out[:, max(0, length - block):length])[:, -1, :] @ head
            out[:, length:length + 1] = draw(logits[:, :n_real_vocab], temperature, top_k, generator)
        return out

    def new_kv_caches(self, batch, device):
        cfg = self.config
        dtype = self.lm_head.weight.dtype
        return [LayerKVCache(batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head, device, dtype)
                for _ in range(cfg.n_layer)]


def _load_quietly(model_class, name_or_dir):
    """(model, loading info) of transformers' from_pretrained, without its progress bar (noise on our
    stderr) or its report on missing weights (the callers raise on those)."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    verbosities = transformers_logging.get_verbosity(), hub_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # offline, a hub name's every retry was a warning; the caller's error says it
    try:
        return model_class.from_pretrained(name_or_dir, output_loading_info=True, trust_remote_code=False)
    finally:
        transformers_logging.set_verbosity(verbosities[0])
        hub_logging.set_verbosity(verbosities[1])


def sample_next_token(logits, temperature, top_k, generator):
    """(B, vocab) logits -> (B, 1) tokens; temperature 0 means greedy. With top_k the draw is among
    the k largest logits only: the same distribution as masking the others to -inf.

    The draw is an exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i is i with
    probability p_i (the Gumbel-max trick in another form). Three vector ops instead of
    torch.multinomial, slower on a CPU, where a small model's token is cheap (see
    logs/README.md#sampling-on-a-cpu)."""
    if temperature < torch.finfo(torch.float32).tiny:  # 0, or below what a float32 holds (1e-300 is 0 there): greedy
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    if temperature < 1e-30:  # x / T could pass float32's 3.4e38 (10 / 1e-38 is inf, and inf - inf NaN): the
        logits = logits - logits.amax(dim=-1, keepdim=True)  # largest subtracted first, which softmax does not see
    if temperature != 1:  # x / 1 is x: one pass over the logits fewer
        logits = logits / temperature
    indices = None
    if top_k is not None and top_k < logits.size(-1):
        logits, indices = torch.topk(logits, top_k)
    probs = F.softmax(logits, dim=-1)
    # a zero draw would let a token of probability 0 win: clamp it to the smallest normal float
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=torch.finfo(probs.dtype).tiny)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    return choice if indices is None else indices.gather(-1, choice)
