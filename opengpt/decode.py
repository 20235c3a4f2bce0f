"""Generation with a KV cache, one token at a time: what sample.py, chat.py and serve.py run.

- Decoder(model, device, dtype=None, compiled=False).stream(prompt_ids, max_new_tokens, temperature=1.0,
  top_k=None, seed=None, stop_ids=(), n_real_vocab=None) yields each new token id as soon as it is drawn
  (batch 1); it stops after yielding a stop id or after max_new_tokens. The prompt and the new tokens
  must fit the model's block (a ValueError says so): chat.py makes room by dropping old turns.
- CachedDecoding(model, batch, device, compiled=False): the step model.generate and Decoder share.
  prefill(idx) runs the prompt through model.hidden_states, filling the cache; step(tokens) is the
  model's forward for one new token per row.

At batch 1 a small model's token is a hundred-odd tiny ops: it costs per-op overhead, not arithmetic. So the
step is the blocks' forward written out with functional ops on the weights, pulled from the modules
once: no module calls, rotary angles and the weights as (in, out) matrices computed once (one mm or addmm
per product), the cache preallocated and read as bmm's operands, and attention a plain bmm-softmax-bmm over
the cache (SDPA's dispatch costs more than its work at one query). Compiled (compiled=True), attention reads
the whole cache with the rows not written yet masked: no shape depends on the position, so one compiled
graph serves every token, its fused kernels replacing most of the ops; its inputs are few (the weights
packed in one buffer that the graph slices, each cache's keys and values once, no aliasing views), as each
input costs wrapper time at every call. On a CPU AOTInductor compiles it ahead of time, once per machine
and shape (kept in inductor's cache folder), and it is called with no Python or guards between the call
and its kernels; elsewhere torch.compile compiles it in each process. On a CPU a step, and the draw
after it, run on one thread (step_threads): their ops are too small to split. What is left of a token's
time on a CPU is mostly the head's product (the (C, V) matrix streamed from memory) and top-k
(logs/README.md#sampling-on-a-cpu).
tests/test_decode.py checks the step's tokens against the model's full forward.
"""
import contextlib
import hashlib
import io
import math
import os
import pathlib
import platform
import sys
import threading
import typing
import warnings

import torch
from torch.nn import functional as F

import model
from model import ACTIVATIONS, rotation_angles, sample_next_token
from opengpt import files, hardware
from opengpt.cli import UserError, first_line


def sampling_dtype(requested, device):
    """The dtype to sample in: float32 on a CPU unless asked otherwise. One token at a time the
    matmuls are vector-times-matrix, which bfloat16 does not speed up, while its casts and oneDNN's
    per-shape kernels cost more: bfloat16 sampled several times slower (logs/README.md#sampling-on-a-cpu)."""
    if requested == "auto" and device == "cpu":
        return "float32"
    return hardware.pick_dtype(requested, device)


def columns(weight):
    """A Linear's (out, in) weight as the (in, out) matrix a row multiplies: on a CPU a contiguous copy,
    so a step's products are one mm on plain memory, no transpose op and no strided reads per token."""
    matrix = weight.t()
    return matrix.contiguous() if matrix.device.type == "cpu" else matrix


def head_columns(model):
    """The head as a (C, V) matrix, what a hidden state multiplies into logits; the head is most of a
    token's time (see logs/README.md#sampling-on-a-cpu)."""
    return columns(model.lm_head.weight)


def linear(x, matrix, bias):
    """x @ matrix + bias, one op: addmm, or mm without a bias."""
    return torch.mm(x, matrix) if bias is None else torch.addmm(bias, x, matrix)


@contextlib.contextmanager
def step_threads(device):
    """One CPU thread for a step's ops: each is too small to split, and splitting one still costs a fork
    and join of the thread pool (much more where the cores are shared: a waiting thread is descheduled).
    The caller's thread count is restored after the step; other devices are left alone."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class CachedDecoding:
    """The model's keys and values for `batch` sequences, and its forward for one new token of each
    (as in eval mode: no dropout). compiled=True runs each step compiled (compiled_step): one graph for
    every position, as the step's shapes do not change with it, under the autocast in force here."""

    def __init__(self, model, batch, device, compiled=False):
        config = model.config
        self.model, self.config = model, config
        self.caches = model.new_kv_caches(batch, device)
        if compiled:  # its step reads the whole buffer, masked: the unused rows must be finite
            for cache in self.caches:
                cache.k.zero_()
                cache.v.zero_()
        self.cache_pairs = tuple((cache.k, cache.v) for cache in self.caches)
        transformer = model.transformer
        # the tensors a step reads, looked up once: a module's attribute lookup costs as much as a tiny op
        matrix = torch.Tensor.t if compiled else columns  # compiled, pack copies them contiguous: one copy, not two
        layers = tuple((b.ln_1.weight, b.ln_1.bias, b.ln_1.eps, matrix(b.attn.c_attn.weight), b.attn.c_attn.bias,
                        b.attn.scale, matrix(b.attn.c_proj.weight), b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                        b.ln_2.eps, matrix(b.mlp.c_fc.weight), b.mlp.c_fc.bias, b.mlp.activation,
                        matrix(b.mlp.c_proj.weight), b.mlp.c_proj.bias) for b in transformer.h)
        self.positions = torch.arange(config.block_size, device=device)
        rotation = None
        if config.rotary:
            # rotate(x) = x * cos2 + swap_halves(x) * sin2: model.rotate's pairs (first * cos - second *
            # sin, first * sin + second * cos), the same floats, in three ops for q and k together
            cos, sin = rotation_angles(self.positions, config.n_embd // config.n_head)
            rotation = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        ln_f = transformer.ln_f.weight, transformer.ln_f.bias, transformer.ln_f.eps
        weights = rotation, layers, ln_f, matrix(model.lm_head.weight)
        self.wte = transformer.wte.weight
        self.wpe = None if config.rotary else transformer.wpe.weight
        # a step's inputs, in buffers of fixed shapes and strides: the compiled step is made for them once
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.compiled = compiled
        if compiled:
            # the weights copied into one buffer (per dtype) that the graph slices: a compiled step's wrapper
            # costs per input tensor, 48 of them apart for 4 layers, 13 so (logs/README.md#the-decode-steps-inputs)
            buffers, layout = pack(weights)
            weights = unpack(buffers, layout)
            self.step_inputs = (self.tokens, self.position, self.positions, self.wte, *(() if self.wpe is None else (self.wpe,)),
                                *buffers, *(t for pair in self.cache_pairs for t in pair))
            step = OneTokenStep(layout, self.wpe is not None, len(buffers), torch.device(device).type)
            self._compiled = compiled_step(step, tuple(Spec.of(t) for t in self.step_inputs))
        self.weights = weights
        self.head = weights[-1]

    @property
    def length(self):
        """Tokens in the cache: the position of the next one."""
        return self.caches[0].length

    def prefill(self, idx):
        """Logits (B, vocab) of the token after idx (B, T), its keys and values now in the cache. A prompt of
        one token (sample.py's default: <|endoftext|>) is a step, which costs a fraction of the modules' forward."""
        if idx.size(1) == 1:
            return self.step(idx[:, 0])
        x = self.model.hidden_states(idx, self.caches)
        return x[:, -1, :] @ self.head

    def step(self, tokens):
        """Logits (B, vocab) of the token after tokens (B,), which follow what the cache holds."""
        position = self.caches[0].length
        if position >= self.config.block_size:
            raise ValueError(f"sequence of {position + 1} tokens exceeds block_size {self.config.block_size}")
        for cache in self.caches:
            cache.length = position + 1
        with step_threads(tokens.device):
            self.tokens.copy_(tokens)
            self.position.fill_(position)
            if self.compiled:
                return self._compiled(self.step_inputs)
            return one_token_forward(self.tokens, self.position, self.positions, self.wte, self.wpe, *self.weights,
                                     self.cache_pairs, position + 1)


def one_token_forward(tokens, position, positions, wte, wpe, rotation, layers, ln_f, head, caches, length=None):
    """Logits (B, vocab) of the token after tokens (B,) at position (a (1,) tensor), its key and value
    written into each layer's cache (caches: a (keys, values) pair per layer). With length None attention
    reads the whole cache with the rows after `position` masked, so no shape depends on the position:
    compiled, one graph serves every token. Eager, length (position + 1) reads only the rows written: a
    mask costs more than it saves there."""
    B, C = tokens.size(0), wte.size(1)
    x = F.embedding(tokens, wte)
    if wpe is not None:
        x = x + wpe.index_select(0, position)
    if rotation is not None:
        cos2, sin2 = rotation[0].index_select(0, position), rotation[1].index_select(0, position)
    later = positions > position if length is None else None  # masked: not yet written
    for (ln_1_w, ln_1_b, ln_1_eps, attn_w, attn_b, scale, attn_proj_w, attn_proj_b, ln_2_w, ln_2_b, ln_2_eps,
         fc_w, fc_b, activation, mlp_proj_w, mlp_proj_b), (cache_k, cache_v) in zip(layers, caches):
        H, T, D = cache_k.shape[1:]  # the cache is (B, heads, block, head_dim)
        qkv = linear(F.layer_norm(x, (C,), ln_1_w, ln_1_b, ln_1_eps), attn_w, attn_b).view(B, 3, H, D)
        qk, v = qkv[:, :2], qkv[:, 2]
        if rotation is not None:
            qk32 = qk.float()
            qk = torch.addcmul(qk32 * cos2, qk32.roll(D // 2, dims=-1), sin2).to(qk.dtype)
        cache_k.index_copy_(2, position, qk[:, 1].unsqueeze(2).to(cache_k.dtype))  # autocast's dtype may differ
        cache_v.index_copy_(2, position, v.unsqueeze(2).to(cache_v.dtype))
        q = qk[:, 0].reshape(B * H, 1, D)
        keys, values = cache_k.view(B * H, T, D), cache_v.view(B * H, T, D)  # bmm's operands, no copies
        if length is None:
            scores = (torch.bmm(q, keys.transpose(1, 2)) * scale).masked_fill_(later, float("-inf"))  # (B * H, 1, block)
        else:
            keys, values = keys[:, :length], values[:, :length]
            scores = torch.bmm(q, keys.transpose(1, 2)) * scale  # (B * H, 1, length)
        y = torch.bmm(F.softmax(scores, dim=-1).to(values.dtype), values)  # (B * H, 1, D)
        x = x + linear(y.view(B, C), attn_proj_w, attn_proj_b)
        h = linear(F.layer_norm(x, (C,), ln_2_w, ln_2_b, ln_2_eps), fc_w, fc_b)
        x = x + linear(activation(h), mlp_proj_w, mlp_proj_b)
    ln_f_w, ln_f_b, ln_f_eps = ln_f
    return torch.mm(F.layer_norm(x, (C,), ln_f_w, ln_f_b, ln_f_eps), head)


class Slot(typing.NamedTuple):
    """Where pack put a tensor: buffers[buffer][offset:offset + its size], viewed as shape."""
    buffer: int
    offset: int
    shape: tuple


def pack(tree):
    """(buffers, layout): the tensors of a nested tuple copied into one flat buffer per dtype, each at an
    offset of 64 bytes' multiple (vector loads stay aligned; the padding is never read), and the tuple with
    each tensor replaced by its Slot; anything else in it (None, floats, functions) stays as it is. A
    tensor is copied once, strided or not (a transposed view becomes its contiguous transpose). unpack undoes it."""
    dtypes, devices, sizes, placed = [], [], [], []

    def slot(x):
        if isinstance(x, tuple):
            return tuple(slot(item) for item in x)
        if not isinstance(x, torch.Tensor):
            return x
        if x.dtype not in dtypes:
            dtypes.append(x.dtype)
            devices.append(x.device)
            sizes.append(0)
        i, align = dtypes.index(x.dtype), max(64 // x.element_size(), 1)
        where = Slot(i, sizes[i] + -sizes[i] % align, tuple(x.shape))
        sizes[i] = where.offset + x.numel()
        placed.append((x, where))
        return where

    layout = slot(tree)
    buffers = tuple(torch.empty(size, dtype=dtype, device=device) for dtype, device, size in zip(dtypes, devices, sizes))
    with torch.no_grad():  # copies of the weights, for inference: never part of a graph that trains them
        for x, where in placed:
            unpack(buffers, where).copy_(x)
    return buffers, layout


def unpack(buffers, layout):
    """The nested tuple pack was given, its tensors now views of the buffers."""
    if isinstance(layout, Slot):
        return buffers[layout.buffer][layout.offset:layout.offset + math.prod(layout.shape)].view(layout.shape)
    if isinstance(layout, tuple):
        return tuple(unpack(buffers, item) for item in layout)
    return layout


class OneTokenStep(torch.nn.Module):
    """one_token_forward as a function of tensors alone, what torch.export takes: CachedDecoding.step_inputs
    are the token, its position, the positions, wte, wpe (absolute positions only), the packed weights'
    buffers, then each layer's keys and values. It runs under the autocast in force when it was made,
    whatever the caller's is later: compiled code could not follow the caller's."""

    def __init__(self, layout, has_wpe, n_buffers, device_type):
        super().__init__()
        self.layout, self.has_wpe, self.n_buffers, self.device_type = layout, has_wpe, n_buffers, device_type
        self.autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

    def forward(self, *step_inputs):
        tokens, position, positions, wte = step_inputs[:4]
        wpe = step_inputs[4] if self.has_wpe else None
        buffers = step_inputs[4 + self.has_wpe:4 + self.has_wpe + self.n_buffers]
        caches = step_inputs[4 + self.has_wpe + self.n_buffers:]
        with torch.autocast(self.device_type, dtype=self.autocast, enabled=self.autocast is not None):
            return one_token_forward(tokens, position, positions, wte, wpe, *unpack(buffers, self.layout),
                                     tuple(zip(caches[::2], caches[1::2])))

    def key(self):
        """What the step computes, besides its inputs' shapes: equal keys, the same compiled code."""
        return described(self.layout), self.has_wpe, self.n_buffers, self.device_type, str(self.autocast)


class Spec(typing.NamedTuple):
    """An input tensor as compiled code sees it, without its values."""
    shape: tuple
    stride: tuple
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor):
        return cls(tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def described(layout):
    """The layout with each activation function by its name in model.ACTIVATIONS: a key that means the
    same in every process."""
    if isinstance(layout, tuple) and not isinstance(layout, Slot):
        return tuple(described(item) for item in layout)
    if callable(layout):
        return next(name for name, activation in ACTIVATIONS.items() if activation is layout)
    return layout


_compiled_steps, _compiling = {}, threading.Lock()
# the code a compiled step runs (this module's and model.py's activations), read once: part of its key on disk
SOURCES = hashlib.sha256(pathlib.Path(model.__file__).read_bytes() + pathlib.Path(__file__).read_bytes()).hexdigest()


def compiled_step(step, specs):
    """A function of step_inputs that returns the logits: `step` (a OneTokenStep) compiled for inputs of
    these specs, made on first use and shared by every CachedDecoding of the same key and specs. On a CPU
    AOTInductor compiles it ahead of time (ahead_of_time_step); elsewhere, or where AOTInductor is missing
    or fails (said in a line on stderr), torch.compile does (dynamo_step)."""
    key = step.key(), specs
    with _compiling:  # a server's threads: one compile each, not one per thread
        if key not in _compiled_steps:
            compiled = None
            if step.device_type == "cpu" and hasattr(torch._inductor, "aoti_load_package"):
                try:
                    compiled = ahead_of_time_step(step, specs)
                except UserError:
                    raise
                except Exception as e:  # a platform AOTInductor does not serve: torch.compile may, and the run goes on
                    print(f"note: AOTInductor could not compile the decode step ({type(e).__name__}: {first_line(e)}); "
                          f"using torch.compile", file=sys.stderr)
            _compiled_steps[key] = compiled or dynamo_step(step)
        return _compiled_steps[key]


def dynamo_step(step):
    """The step through torch.compile: Dynamo checks its guards on every input at each call, then the graph
    runs. On a CPU inductor's wrapper, which calls the step's ~50 kernels, is C++: its Python wrapper cost
    ~8% of a token (logs/README.md#the-decode-step-round-6)."""
    options = {"cpp_wrapper": True} if step.device_type == "cpu" else None

    def one_token_step(*step_inputs):
        return step(*step_inputs)
    compiled = torch.compile(one_token_step, dynamic=False, options=options)
    return lambda step_inputs: compiled(*step_inputs)


def ahead_of_time_step(step, specs):
    """The step exported and compiled ahead of time by AOTInductor into a library that takes its inputs in
    C++: no guards, no Python between the call and the kernels; 1.33x torch.compile's step for the same
    tokens (logs/README.md#the-decode-step-ahead-of-time). The compile (~15 s) is kept on disk, in
    inductor's cache folder, under a key of everything that shapes the code: a later process loads it
    in milliseconds. Nothing checks the inputs at a call: compiled_step's key did, once."""
    path = package_path(step, specs)
    if not os.path.exists(path):
        examples = tuple(torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype) for spec in specs)
        package = io.BytesIO()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "`isinstance\\(treespec, LeafSpec\\)` is deprecated", FutureWarning)  # torch's own
                torch._inductor.aoti_compile_and_package(torch.export.export(step, examples), package_path=package)
        except Exception as e:  # inductor writes its build files in the cache folder too
            unwritable = hardware.unwritable_folder_error(e)
            if unwritable is None:
                raise
            raise hardware.compile_cache_error("could not compile the decode step", unwritable) from None
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            files.write_atomically(path, lambda temp_path: pathlib.Path(temp_path).write_bytes(package.getvalue()))
        except OSError as e:
            raise hardware.compile_cache_error("could not keep the compiled decode step", e, os.path.dirname(path)) from None
    loader = torch._inductor.aoti_load_package(path).loader
    run = getattr(loader, "boxed_run", loader.run)  # boxed_run (newer torch) takes the list it is given
    return lambda step_inputs: run(list(step_inputs))[0]


def package_path(step, specs):
    """Where ahead_of_time_step keeps `step` compiled for inputs of these specs: a file named by a hash of
    everything that shapes the compiled code, so that no process loads code made for other inputs."""
    key = repr((step.key(), specs, torch.__version__, torch.backends.cpu.get_cpu_capability(), platform.machine(), SOURCES))
    return os.path.join(ahead_of_time_folder(), hashlib.sha256(key.encode()).hexdigest()[:32] + ".pt2")


def ahead_of_time_folder():
    """Where ahead_of_time_step keeps its compiles: in inductor's cache folder, where torch.compile keeps its own."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    return os.path.join(cache_dir(), "opengpt_decode")


def draw(logits, temperature, top_k, generator):
    """model.sample_next_token on one CPU thread, as a step runs (step_threads): its ops are as small."""
    with step_threads(logits.device):
        return sample_next_token(logits, temperature, top_k, generator)


class Decoder:
    """Streams a model's continuation of one prompt, token by token (module docstring)."""

    def __init__(self, model, device, dtype=None, compiled=False):
        self.model, self.device, self.compiled = model, device, compiled
        self.dtype = dtype or "float32"  # a hardware.DTYPES name: bfloat16 and float16 sample under autocast

    def stream(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, seed=None, stop_ids=(), n_real_vocab=None):
        """An iterator of the new token ids; raises ValueError at once where the request cannot be met."""
        block = self.model.config.block_size
        if len(prompt_ids) == 0:
            raise ValueError("the prompt is empty: give at least one token (a document starts with <|endoftext|>)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be zero or positive, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > block:
            raise ValueError(f"the prompt's {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} exceed the "
                             f"model's block_size {block}")
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()  # a fresh draw every time
        else:
            generator.manual_seed(seed)
        return self._tokens(list(prompt_ids), max_new_tokens, temperature, top_k, generator, frozenset(stop_ids), n_real_vocab)

    def _tokens(self, prompt_ids, max_new_tokens, temperature, top_k, generator, stop_ids, n_real_vocab):
        decoding = token_tensor = None  # the cache, made at the first token; the last token drawn
        for _ in range(max_new_tokens):
            # grad mode and autocast are per thread: entered around each token's work, never across a yield,
            # so the caller's code between tokens runs as it would without us
            with torch.no_grad(), hardware.autocast_context(self.device, self.dtype):
                if decoding is None:
                    decoding = CachedDecoding(self.model, 1, self.device, self.compiled)
                    logits = decoding.prefill(torch.tensor([prompt_ids], dtype=torch.long, device=self.device))
                else:
                    logits = decoding.step(token_tensor)
                token_tensor = draw(logits[:, :n_real_vocab], temperature, top_k, generator)[:, 0]
                token = token_tensor.item()
            yield token
            if token in stop_ids:
                return
