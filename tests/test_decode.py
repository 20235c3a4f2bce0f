"""opengpt/decode.py: the KV-cached one-token step computes the model's own logits, and Decoder.stream
draws exactly the tokens of a loop that reruns the whole sequence through the model for every token."""
import errno

import pytest
import torch

from model import GPT, GPTConfig, sample_next_token
from opengpt import decode, hardware
from opengpt.cli import UserError
from opengpt.decode import CachedDecoding, Decoder

ARCHITECTURES = [dict(), dict(rotary=True, activation="relu2", bias=False), dict(scale_attn_by_inverse_layer_idx=True)]


def tiny_gpt(**overrides):
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=320, dropout=0.0, bias=True) | overrides
    return GPT(GPTConfig(**args)).eval()


def reference_tokens(model, prompt_ids, max_new_tokens, temperature, top_k, seed, n_real_vocab=None):
    """nanoGPT's loop: the whole sequence through the model for every new token, no cache."""
    generator = torch.Generator().manual_seed(seed)
    idx = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model.full_logits(idx)[:, -1, :n_real_vocab]
            idx = torch.cat((idx, sample_next_token(logits, temperature, top_k, generator)), dim=1)
    return idx[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_token_step_computes_the_logits_of_the_full_forward(architecture):
    model = tiny_gpt(**architecture)
    idx = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        expected = model.full_logits(idx)
        decoding = CachedDecoding(model, 2, "cpu")
        logits = [decoding.prefill(idx[:, :3])] + [decoding.step(idx[:, t]) for t in range(3, 16)]
        with pytest.raises(ValueError, match="exceeds block_size 16"):
            decoding.step(idx[:, 0])
        one_token_prompt = CachedDecoding(model, 2, "cpu").prefill(idx[:, :1])  # taken as a step
    torch.testing.assert_close(torch.stack(logits, dim=1), expected[:, 2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one_token_prompt, expected[:, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, 5), (0.8, None)])
def test_stream_draws_the_tokens_of_the_uncached_reference(architecture, temperature, top_k):
    model = tiny_gpt(**architecture)
    prompt = [5, 17, 300, 2]
    tokens = list(Decoder(model, "cpu").stream(prompt, 12, temperature=temperature, top_k=top_k, seed=7))
    assert tokens == reference_tokens(model, prompt, 12, temperature, top_k, seed=7)
    # model.generate, with and without its cache, draws the same from the same generator
    for use_cache in (True, False):
        generated = model.generate(torch.tensor([prompt]), 12, temperature=temperature, top_k=top_k,
                                   generator=torch.Generator().manual_seed(7), use_cache=use_cache)
        assert generated[0, len(prompt):].tolist() == tokens


def skip_without_compile():
    try:
        hardware.check_compile_works("cpu")
    except UserError as e:
        pytest.skip(str(e))


def assert_compiled_step_matches_the_references(model):
    """The compiled step's logits are the full forward's, and Decoder draws the uncached reference's tokens."""
    idx = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        decoding = CachedDecoding(model, 1, "cpu", compiled=True)
        logits = [decoding.prefill(idx[:, :3])] + [decoding.step(idx[:, t]) for t in range(3, 16)]
        torch.testing.assert_close(torch.stack(logits, dim=1), model.full_logits(idx)[:, 2:], rtol=1e-5, atol=1e-5)
    prompt = [5, 17, 300, 2]
    for temperature, top_k in [(0.0, None), (1.0, 5)]:
        tokens = list(Decoder(model, "cpu", compiled=True).stream(prompt, 12, temperature=temperature, top_k=top_k, seed=7))
        assert tokens == reference_tokens(model, prompt, 12, temperature, top_k, seed=7)


@pytest.mark.parametrize("architecture", ARCHITECTURES[:2])  # the third differs from the first by a float only
def test_the_ahead_of_time_step_computes_the_full_forwards_logits_and_is_compiled_once_per_machine(architecture, tmp_path,
                                                                                                   monkeypatch):
    skip_without_compile()
    monkeypatch.setattr(decode, "ahead_of_time_folder", lambda: str(tmp_path))
    monkeypatch.setattr(decode, "_compiled_steps", {})
    model = tiny_gpt(**architecture)
    assert_compiled_step_matches_the_references(model)
    assert len(list(tmp_path.glob("*.pt2"))) == 1 and not list(tmp_path.glob(".*"))  # one package, no temp file left
    # a later process finds it on disk: loaded, not compiled again, the same logits
    monkeypatch.setattr(decode, "_compiled_steps", {})
    with monkeypatch.context() as loading_only:
        loading_only.setattr(torch._inductor, "aoti_compile_and_package", lambda *args, **kwargs: pytest.fail("compiled again"))
        assert_compiled_step_matches_the_references(model)


def test_a_package_is_named_by_everything_that_shapes_its_code(monkeypatch):
    model = tiny_gpt(rotary=True, activation="relu2", bias=False)
    paths = []
    monkeypatch.setattr(decode, "compiled_step", lambda step, specs: paths.append(decode.package_path(step, specs)))

    def path_of(model, batch=1, autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            CachedDecoding(model, batch, "cpu", compiled=True)  # its step and inputs, named, not compiled
        return paths[-1]

    same = path_of(model)
    assert path_of(tiny_gpt(rotary=True, activation="relu2", bias=False)) == same  # other weights, same code
    others = [path_of(model, batch=2), path_of(model, autocast=True), path_of(tiny_gpt(rotary=True, bias=False)),
              path_of(tiny_gpt(rotary=True, activation="relu2", bias=False, n_layer=3))]
    assert len({same, *others}) == 5


def test_the_ahead_of_time_step_runs_under_the_autocast_it_was_made_with(tmp_path, monkeypatch):
    skip_without_compile()
    monkeypatch.setattr(decode, "ahead_of_time_folder", lambda: str(tmp_path))
    monkeypatch.setattr(decode, "_compiled_steps", {})
    model = tiny_gpt(rotary=True, activation="relu2", bias=False)
    idx = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager, compiled = CachedDecoding(model, 1, "cpu"), CachedDecoding(model, 1, "cpu", compiled=True)
            expected = [eager.prefill(idx[:, :3])] + [eager.step(idx[:, t]) for t in range(3, 8)]
            got = [compiled.prefill(idx[:, :3])] + [compiled.step(idx[:, t]) for t in range(3, 7)]
        got.append(compiled.step(idx[:, 7]))  # outside autocast: still the bfloat16 step it was compiled as
    assert all(t.dtype == torch.bfloat16 for t in got)
    torch.testing.assert_close(torch.stack(got).float(), torch.stack(expected).float(), rtol=0.05, atol=0.05)


def test_the_dynamo_step_the_gpus_take_computes_the_full_forwards_logits_in_one_graph(monkeypatch):
    """Off the CPU the step goes through torch.compile (AOTInductor is used on CPUs only): tested here on the CPU."""
    skip_without_compile()
    monkeypatch.setattr(decode, "ahead_of_time_step", lambda step, specs: decode.dynamo_step(step))
    monkeypatch.setattr(decode, "_compiled_steps", {})
    torch._dynamo.reset()  # a fresh count of compiles: past dynamo's limit a function would run eagerly
    torch._dynamo.utils.counters.clear()
    assert_compiled_step_matches_the_references(tiny_gpt(rotary=True, activation="relu2", bias=False))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph for every position


def test_stream_stops_after_yielding_a_stop_id_or_after_max_new_tokens():
    model = tiny_gpt()
    decoder = Decoder(model, "cpu")
    tokens = list(decoder.stream([1, 2, 3], 10, temperature=1.0, seed=3))
    assert len(tokens) == 10
    stop = tokens[4]
    first_stop = tokens.index(stop)
    assert list(decoder.stream([1, 2, 3], 10, temperature=1.0, seed=3, stop_ids=(999, stop))) == tokens[:first_stop + 1]
    assert list(decoder.stream([1, 2, 3], 0)) == []
    # a prompt and its reply that fill the block exactly are fine; one token more is the caller's problem
    assert len(list(decoder.stream([1] * 6, 10, temperature=0.0))) == 10
    with pytest.raises(ValueError, match="7 tokens \\+ max_new_tokens 10 exceed the model's block_size 16"):
        decoder.stream([1] * 7, 10)  # raised at the call, before the first token is asked for
    with pytest.raises(ValueError, match="empty"):
        decoder.stream([], 3)


def test_stream_seeds_its_draws_and_never_draws_padding_tokens():
    model = tiny_gpt()
    with torch.no_grad():
        model.lm_head.weight[300:] += 5.0  # padding rows would win every draw
    decoder = Decoder(model, "cpu")
    draws = [list(decoder.stream([0], 15, seed=seed, n_real_vocab=300)) for seed in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2]
    assert max(max(d) for d in draws) < 300
    assert draws[0] == reference_tokens(model, [0], 15, 1.0, None, seed=1, n_real_vocab=300)


def test_stream_leaves_grad_mode_and_autocast_to_the_caller_between_tokens():
    model = tiny_gpt(rotary=True)
    stream = Decoder(model, "cpu", "bfloat16").stream([1, 2], 3, seed=0)
    next(stream)
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    assert all(0 <= t < 320 for t in stream)  # the rest, drawn under bfloat16 autocast


def test_a_step_runs_on_one_thread_and_gives_the_caller_back_its_thread_count(monkeypatch):
    model = tiny_gpt(rotary=True, activation="relu2", bias=False)
    idx = torch.randint(0, 320, (1, 6))
    previous = torch.get_num_threads()
    seen = []
    real_forward = decode.one_token_forward
    monkeypatch.setattr(decode, "one_token_forward", lambda *args: seen.append(torch.get_num_threads()) or real_forward(*args))
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            decoding = CachedDecoding(model, 1, "cpu")
            decoding.prefill(idx[:, :5])
            logits = decoding.step(idx[:, 5])
        assert seen == [1] and torch.get_num_threads() == 2
        torch.testing.assert_close(logits, model.full_logits(idx)[:, -1], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(previous)


def test_pack_puts_every_tensor_in_one_aligned_buffer_per_dtype_and_unpack_gives_views_of_them():
    a, b, c = torch.randn(3, 5, requires_grad=True), torch.arange(7), torch.randn(2, 2, dtype=torch.float64)
    tree = (a, (None, 1e-5, torch.relu, b), ((c, a[1:]),))
    buffers, layout = decode.pack(tree)
    assert [t.dtype for t in buffers] == [torch.float32, torch.int64, torch.float64]
    assert not any(t.requires_grad for t in buffers)  # copies for inference, even of a parameter
    hash(layout)  # compiled_step's cache key
    out = decode.unpack(buffers, layout)
    assert out[1][:3] == (None, 1e-5, torch.relu)
    for got, want in ((out[0], a), (out[1][3], b), (out[2][0][0], c), (out[2][0][1], a[1:])):
        assert torch.equal(got, want) and got.dtype == want.dtype
        assert got.untyped_storage().data_ptr() in {t.untyped_storage().data_ptr() for t in buffers}  # a view, no copy
        assert got.data_ptr() % 64 == 0  # vector loads stay aligned


def test_a_compiled_step_that_cannot_be_kept_on_disk_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "ahead_of_time_folder", lambda: str(tmp_path))
    monkeypatch.setattr(decode, "_compiled_steps", {})
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda exported, package_path: package_path.write(b"pt2"))

    def full_disk(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(decode.files, "write_atomically", full_disk)
    with pytest.raises(UserError, match=f"could not keep the compiled decode step in {tmp_path} \\(No space left on device, "
                                        ".* MB free there\\); free space there, .* or use --compile=False"):
        with torch.no_grad():
            CachedDecoding(tiny_gpt(), 1, "cpu", compiled=True)
    assert list(tmp_path.iterdir()) == []


def test_a_compile_cache_folder_that_fills_during_the_compile_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(decode, "ahead_of_time_folder", lambda: str(tmp_path))
    monkeypatch.setattr(decode, "_compiled_steps", {})

    def linker_out_of_space(exported, package_path):  # as inductor reports a compiler run that failed
        error = RuntimeError("C++ compile error")
        error.output = "/usr/bin/ld: final link failed: No space left on device\ncollect2: error: ld returned 1 exit status"
        raise RuntimeError("InductorError: CppCompileError: C++ compile error") from error
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", linker_out_of_space)
    monkeypatch.setattr("torch._inductor.runtime.cache_dir_utils.cache_dir", lambda: str(tmp_path))  # where inductor builds
    with pytest.raises(UserError, match=f"could not compile the decode step in {tmp_path} \\(No space left on device, "
                                        ".* MB free there\\); free space there, .* or use --compile=False"):
        with torch.no_grad():
            CachedDecoding(tiny_gpt(), 1, "cpu", compiled=True)
    assert capsys.readouterr().err == ""  # no fallback to torch.compile, which would fail the same way
    assert list(tmp_path.iterdir()) == []


def test_where_ahead_of_time_compiling_fails_the_step_says_so_and_takes_torch_compile(tmp_path, monkeypatch, capsys):
    skip_without_compile()
    monkeypatch.setattr(decode, "ahead_of_time_folder", lambda: str(tmp_path))
    monkeypatch.setattr(decode, "_compiled_steps", {})

    def unsupported(exported, package_path):
        raise RuntimeError("AOTInductor does not support this platform\nmore detail")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", unsupported)
    assert_compiled_step_matches_the_references(tiny_gpt(rotary=True, activation="relu2", bias=False))
    assert capsys.readouterr().err.count("note: AOTInductor could not compile the decode step (RuntimeError: AOTInductor "
                                         "does not support this platform); using torch.compile\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_decode_side_by_side_refuses_a_base_without_decode_py_and_zero_rounds_in_one_line():
    import subprocess

    from conftest import REPO, assert_user_error, run_script
    assert_user_error(run_script("logs/decode_side_by_side.py", "--rounds=0"), "--rounds=0 must be at least 1")
    assert_user_error(run_script("logs/decode_side_by_side.py", "--base=nosuchcommit"), "git cannot show opengpt/decode.py at --base=nosuchcommit")
    added = subprocess.run(["git", "-C", REPO, "log", "--diff-filter=A", "--format=%h", "--", "opengpt/decode.py"],
                           capture_output=True, text=True, check=True).stdout.split()[-1]
    before = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", f"{added}^"], capture_output=True, text=True, check=True).stdout.strip()
    assert_user_error(run_script("logs/decode_side_by_side.py", f"--base={before}"), f"it was added in {added}")
