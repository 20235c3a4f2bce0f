"""Our rotary GPT in transformers' GPT-NeoX format, both ways (export.py writes it, GPT.from_pretrained
reads it back).

GPT-2's blocks with rotary positions are GPT-NeoX's blocks with sequential residuals
(use_parallel_residual=False), the whole head dimension rotated, and each rotated pair made of
element i and i + head_dim / 2, as ours. What differs is names, and the order of the fused
query-key-value rows: ours are all queries, then all keys, then all values; GPT-NeoX's are each
head's query, key and value together. Bias-free models are written with zero biases, and a model
trained with scale_attn_by_inverse_layer_idx with that scale folded into each layer's queries.
"""
import torch

from model import ROTARY_BASE

# GPT-NeoX's parameter names (under gpt_neox.) -> ours, for the parts of one layer and the ends
LAYER_NAMES = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "attention.query_key_value": "attn.c_attn",
               "attention.dense": "attn.c_proj", "mlp.dense_h_to_4h": "mlp.c_fc", "mlp.dense_4h_to_h": "mlp.c_proj"}
END_NAMES = {"gpt_neox.embed_in": "transformer.wte", "gpt_neox.final_layer_norm": "transformer.ln_f", "lm_head": "lm_head"}


def neox_config(config, eot_token):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, intermediate_size=4 * config.n_embd, max_position_embeddings=config.block_size,
        # transformers 4's names for the rotation, which transformers 5 turns into its rope_parameters
        rotary_pct=1.0, rotary_emb_base=ROTARY_BASE,
        use_parallel_residual=False, hidden_act=config.activation, layer_norm_eps=1e-5, attention_bias=True,
        hidden_dropout=config.dropout, attention_dropout=config.dropout, tie_word_embeddings=True,
        bos_token_id=eot_token, eos_token_id=eot_token,
    )


def is_ours(hf_config):
    """Whether a GPTNeoXConfig describes a model our GPT computes (Pythia's parallel residuals and
    partial rotation, say, it does not; nor another LayerNorm epsilon than nn.LayerNorm's)."""
    from model import ACTIVATIONS

    rope = getattr(hf_config, "rope_parameters", None) or {}  # transformers 5; 4 has rotary_pct, rotary_emb_base
    rotated_share = rope.get("partial_rotary_factor", getattr(hf_config, "rotary_pct", None))
    base = rope.get("rope_theta", getattr(hf_config, "rotary_emb_base", None))
    return (not hf_config.use_parallel_residual and rotated_share == 1.0 and base == ROTARY_BASE
            and hf_config.hidden_act in ACTIVATIONS
            and hf_config.intermediate_size == 4 * hf_config.hidden_size and hf_config.tie_word_embeddings
            and hf_config.layer_norm_eps == 1e-5)


def our_name(neox_name):
    """Our state_dict key for a GPT-NeoX parameter name, or None."""
    for theirs, ours in END_NAMES.items():
        if neox_name.startswith(theirs + "."):
            return ours + neox_name[len(theirs):]
    parts = neox_name.split(".")
    if parts[:2] != ["gpt_neox", "layers"] or len(parts) < 5:
        return None
    part = LAYER_NAMES.get(".".join(parts[3:-1]))
    return part and f"transformer.h.{parts[2]}.{part}.{parts[-1]}"


def qkv_rows_to_neox(tensor, n_head):
    q, k, v = (t.reshape(n_head, -1, *t.shape[1:]) for t in tensor.chunk(3, dim=0))
    return torch.cat((q, k, v), dim=1).reshape(tensor.shape)


def qkv_rows_from_neox(tensor, n_head):
    per_head = tensor.reshape(n_head, 3, -1, *tensor.shape[1:])
    return per_head.transpose(0, 1).reshape(tensor.shape)


def to_neox(model, eot_token):
    """A transformers GPTNeoXForCausalLM computing what our rotary GPT computes."""
    from transformers import GPTNeoXForCausalLM

    hf_model = GPTNeoXForCausalLM(neox_config(model.config, eot_token))
    ours = model.state_dict()
    with torch.no_grad():
        for key, param in hf_model.named_parameters():
            name = our_name(key)
            if name is None:
                raise KeyError(f"transformers' GPT-NeoX has {key}, which our GPT lacks")
            value = ours[name] if name in ours else torch.zeros_like(param)  # bias=False: zero biases
            if ".query_key_value." in key and model.config.scale_attn_by_inverse_layer_idx:
                value = queries_scaled(value, 1 / (int(key.split(".")[2]) + 1))
            param.copy_(qkv_rows_to_neox(value, model.config.n_head) if ".query_key_value." in key else value)
    return hf_model


def queries_scaled(qkv_rows, factor):
    """Our fused rows with the queries' (the first third) multiplied by factor: GPT-NeoX has no
    scale_attn_by_inverse_layer_idx, and q.k / (layer + 1) is (q / (layer + 1)).k, rotated or not."""
    scaled = qkv_rows.clone()
    scaled[:len(scaled) // 3] *= factor
    return scaled


def from_neox(hf_model, gpt_class, dropout):
    """Our rotary GPT with the weights of a GPTNeoXForCausalLM that is_ours."""
    from model import GPTConfig

    c = hf_model.config
    model = gpt_class(GPTConfig(block_size=c.max_position_embeddings, vocab_size=c.vocab_size, n_layer=c.num_hidden_layers,
                                n_head=c.num_attention_heads, n_embd=c.hidden_size, dropout=dropout, bias=True, rotary=True,
                                activation=c.hidden_act))
    ours = model.state_dict()
    with torch.no_grad():
        for key, value in hf_model.state_dict().items():
            name = our_name(key)
            if name is None or name not in ours:
                continue
            ours[name].copy_(qkv_rows_from_neox(value, c.num_attention_heads) if ".query_key_value." in key else value)
    return model
