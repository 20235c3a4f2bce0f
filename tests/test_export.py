"""export.py: the transformers folder computes our logits, tokenizes as tiktoken does, generates
offline, loads back into GPT, and bad input never leaves a half-written folder; a kill at any moment
never loses the earlier export, and no folder a user works in is ever replaced."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch


from opengpt import checkpoint as ckpt
from opengpt import cli
import export
from conftest import REPO, assert_one_line_error, assert_user_error, run_script
from model import GPT, GPTConfig
from conftest import tiny_documents
from opengpt.tokenizer import EOT_TOKEN, GPT2_VOCAB_SIZE, GPT2Tokenizer, gpt2_encoding, train_bpe

transformers = pytest.importorskip("transformers")

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50304, dropout=0.0)
TEXTS = [
    "Hello world, it's a test. They'll say we've done 12345 things!",
    "滚滚长江东逝水，浪花淘尽英雄。是非成败转头空。",
    "Mixed 中文 and English: 三国演义 (Romance of the Three Kingdoms) 1522年",
    "emoji 🙂👍🏽 and 🇨🇳, accents: café naïve Ångström",
    "spaces   between\n\n\n  lines\t\t tabs   trailing   ",
    "  leading spaces and a document end<|endoftext|>next document",
]


def write_checkpoint(out_dir, bias, seed=0, tokenizer=None, vocab_size=TINY["vocab_size"], rotary=False,
                     activation="gelu_new", document_mask=False):
    """A tiny model with every parameter random (biases and LayerNorm weights too, so a weight
    exported to the wrong place shows in the logits), saved as train.py saves it."""
    torch.manual_seed(seed)
    masked = dict(document_mask=True, eot_token=GPT2_VOCAB_SIZE - 1) if document_mask else {}
    model = GPT(GPTConfig(**TINY | {"vocab_size": vocab_size}, bias=bias, rotary=rotary, activation=activation, **masked))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    optimizer = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model_args = dict(TINY, bias=bias, vocab_size=vocab_size, rotary=rotary, activation=activation, **masked)
    state = ckpt.training_state(model, optimizer, scaler, model_args, 2, 9.9, {"bias": bias},
                                torch.Generator().manual_seed(0), tokenizer or GPT2Tokenizer(), torch.Generator())
    os.makedirs(out_dir, exist_ok=True)
    ckpt.save(state, os.path.join(out_dir, ckpt.FILENAME))
    return model.eval()


def run_export(monkeypatch, capsys, *args):
    """export.py's CLI in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["export.py", *args])
    try:
        cli.run(export.main)
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


@pytest.fixture(autouse=True, scope="module")
def restore_sigterm():
    """export.main installs a SIGTERM handler, as the script's process should have; pytest's comes back after."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def leftovers(parent):
    """What an export left next to its target: any hidden entry but its lock file (left in place, as
    prepare.py leaves its own: folder_lock.py)."""
    return [name for name in os.listdir(parent) if name.startswith(".") and not name.endswith(".lock")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{bias: (our model, exported folder)} for a bias=True and a bias=False model (that one with
    ReLU squared), and under "rotary" a bias-free rotary one with ReLU squared, our default recipe's
    model (exported as GPT-NeoX)."""
    result = {}
    with pytest.MonkeyPatch.context() as mp:
        for bias in (True, False, "rotary"):
            root = tmp_path_factory.mktemp(f"bias{bias}")
            model = write_checkpoint(root / "run", bias is True, seed=int(bias is True), rotary=bias == "rotary",
                                     activation="gelu_new" if bias is True else "relu2")
            mp.setattr(sys, "argv", ["export.py", f"--out_dir={root / 'run'}", f"--export_dir={root / 'hf'}"])
            export.main()
            result[bias] = (model, str(root / "hf"))
    return result


@pytest.fixture
def offline(monkeypatch):
    """No hub, and no network at all: any connection attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("the export tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def sample_ids(seed=0):
    """A full block of token ids, padding ids included, which the model must also handle."""
    return torch.randint(0, TINY["vocab_size"], (2, TINY["block_size"]), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bias", [True, False])
def test_exported_model_gives_our_logits(exports, offline, bias):
    from transformers import GPT2LMHeadModel

    model, folder = exports[bias]
    hf_model = GPT2LMHeadModel.from_pretrained(folder).eval()
    assert hf_model.config.vocab_size == 50304 and hf_model.config.n_positions == TINY["block_size"]
    assert hf_model.config.bos_token_id == hf_model.config.eos_token_id == EOT_TOKEN
    idx = sample_ids()
    with torch.no_grad():
        difference = (hf_model(idx).logits - model.full_logits(idx)).abs().max().item()
    assert difference < 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_from_pretrained_round_trip_gives_our_logits(exports, offline, bias):
    model, folder = exports[bias]
    loaded = GPT.from_pretrained(folder).eval()
    assert loaded.config.vocab_size == 50304  # the padded vocabulary survives the round trip
    idx = sample_ids(seed=1)
    with torch.no_grad():
        assert (loaded.full_logits(idx) - model.full_logits(idx)).abs().max().item() < 1e-5


def test_a_rotary_model_exports_as_gpt_neox_with_our_logits_and_comes_back(exports, offline):
    from transformers import AutoModelForCausalLM, GPTNeoXForCausalLM, pipeline

    model, folder = exports["rotary"]
    hf_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert isinstance(hf_model, GPTNeoXForCausalLM)
    idx = sample_ids(seed=2)
    with torch.no_grad():
        assert (hf_model(idx).logits - model.full_logits(idx)).abs().max().item() < 1e-4
        loaded = GPT.from_pretrained(folder).eval()
        assert loaded.config.rotary and (loaded.full_logits(idx) - model.full_logits(idx)).abs().max().item() < 1e-5
    text = pipeline("text-generation", model=folder)("长江", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert text.startswith("长江") and len(text) > 2


def test_a_gpt_neox_model_of_another_shape_does_not_load_as_ours(tmp_path, offline):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    # Pythia's blocks: attention and MLP side by side from the same input, a quarter of each head rotated
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, use_parallel_residual=True,
                                     rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                          partial_rotary_factor=0.25))).save_pretrained(tmp_path / "pythia")
    with pytest.raises(cli.UserError, match="another shape"):
        ckpt.gpt2_model(str(tmp_path / "pythia"), 0.0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16, use_parallel_residual=False,
                                     hidden_act="gelu_new", tie_word_embeddings=True, layer_norm_eps=1e-2,
                                     rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=1.0))
                       ).save_pretrained(tmp_path / "eps")
    with pytest.raises(cli.UserError, match="LayerNorm epsilon"):
        ckpt.gpt2_model(str(tmp_path / "eps"), 0.0)


def test_exporting_a_model_trained_with_the_document_mask_says_where_transformers_differs(tmp_path, monkeypatch, capsys):
    """transformers' GPT-2 has no --document_mask: its logits are ours for one document, not for several."""
    write_checkpoint(tmp_path / "run", bias=True, document_mask=True)
    status, stderr = run_export(monkeypatch, capsys, f"--out_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'hf'}")
    assert status == 0, stderr
    assert "was trained with --document_mask=True; the export attends across its end-of-text token" in stderr
    assert json.loads((tmp_path / "hf" / export.PROVENANCE_FILE).read_text())["model_args"]["document_mask"] is True


def test_every_exported_file_has_a_new_files_mode(exports):
    umask = os.umask(0)
    os.umask(umask)
    _, folder = exports[True]
    assert {name: oct(os.stat(os.path.join(folder, name)).st_mode & 0o777) for name in os.listdir(folder)} == \
        {name: oct(0o666 & ~umask) for name in os.listdir(folder)}


def test_a_folder_without_tokenizer_json_is_read_with_gpt2s_only_if_its_vocabulary_is_gpt2s(exports, tmp_path, offline):
    """An older save (vocab.json and merges.txt, no tokenizer.json) of GPT-2's own vocabulary reads with
    GPT-2's tokenizer; one with a vocabulary of its own is refused, not read with GPT-2's ids."""
    _, folder = exports[True]
    older = tmp_path / "older"
    shutil.copytree(folder, older)
    (older / "tokenizer.json").unlink()
    assert ckpt.pretrained_tokenizer(str(older)).kind == "gpt2"
    vocab = json.loads((older / "vocab.json").read_text(encoding="utf-8"))
    first, second = sorted(vocab, key=vocab.get)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # its own BPE: the same strings, other ids
    (older / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(cli.UserError, match="has no tokenizer.json, and its vocabulary is not GPT-2's"):
        ckpt.pretrained_tokenizer(str(older))


def test_a_gpt_neox_folder_missing_a_weight_is_one_line(exports, tmp_path, offline):
    from safetensors.torch import load_file, save_file

    _, folder = exports["rotary"]
    truncated = tmp_path / "truncated"
    shutil.copytree(folder, truncated)
    weights = load_file(truncated / "model.safetensors")
    dropped = next(k for k in weights if "dense_h_to_4h.weight" in k)
    del weights[dropped]
    save_file(weights, truncated / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(cli.UserError, match="weights missing for .*dense_h_to_4h"):
        ckpt.gpt2_model(str(truncated), 0.0)


def test_tokenizer_gives_tiktoken_ids(exports, offline):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(exports[False][1])
    assert len(hf_tokenizer) == GPT2_VOCAB_SIZE and hf_tokenizer.eos_token_id == EOT_TOKEN
    encoding = gpt2_encoding()
    for text in TEXTS:
        ids = encoding.encode(text, allowed_special="all")
        assert hf_tokenizer(text)["input_ids"] == ids, text
        assert hf_tokenizer.decode(ids) == text


def test_vocab_and_merges_are_gpt2s(exports):
    # Facts of OpenAI's released vocab.json and merges.txt, which ours must reproduce.
    folder = exports[False][1]
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        version, *merges = f.read().splitlines()
    assert version == "#version: 0.2"
    assert len(vocab) == GPT2_VOCAB_SIZE and len(merges) == 50000
    assert vocab["!"] == 0 and vocab["Ġt"] == 256 and vocab["Ġthe"] == 262 and vocab["<|endoftext|>"] == EOT_TOKEN
    assert merges[:3] == ["Ġ t", "Ġ a", "h e"]
    assert len(export.bytes_to_unicode()) == 256 and len(set(export.bytes_to_unicode().values())) == 256


def test_pipeline_generates_offline(exports, offline):
    from transformers import pipeline

    generator = pipeline("text-generation", model=exports[True][1])
    prompt = "长江"  # 6 tokens: with 8 new ones, within the tiny model's 16 positions
    text = generator(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text) > len(prompt)


def test_trained_tokenizer_exports_with_our_ids_and_generates_offline(tmp_path, offline):
    from transformers import AutoTokenizer, pipeline

    bpe = train_bpe(tiny_documents(300), 300)
    write_checkpoint(tmp_path / "run", bias=False, tokenizer=bpe, vocab_size=320)  # padded like train.py's
    status = subprocess.run([sys.executable, os.path.join(REPO, "export.py"), f"--out_dir={tmp_path / 'run'}",
                             f"--export_dir={tmp_path / 'hf'}"], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert status.returncode == 0, status.stderr
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS[:5] + ["滚滚长江东逝水\n\t浪花淘尽英雄"]:
        assert hf_tokenizer(text)["input_ids"] == bpe.encode(text), text
    assert hf_tokenizer.eos_token_id == bpe.eot_token == 0
    generator = pipeline("text-generation", model=str(tmp_path / "hf"))
    text = generator("长江", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("长江")
    # and sample.py reads the folder back with the same tokenizer
    loaded = ckpt.pretrained_tokenizer(str(tmp_path / "hf"))
    assert loaded.token_bytes == bpe.token_bytes and loaded.eot_token == bpe.eot_token


def test_generation_never_picks_padding_tokens(exports, offline):
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel.from_pretrained(exports[True][1]).eval()
    # Make padding id 50300 the certain winner: constant final hidden state, its row aligned with it.
    with torch.no_grad():
        hidden = torch.randn(TINY["n_embd"])
        hf_model.transformer.ln_f.weight.zero_()
        hf_model.transformer.ln_f.bias.copy_(hidden)
        hf_model.lm_head.weight[50300] = 100 * hidden
    prompt = torch.tensor([[EOT_TOKEN]])
    unsuppressed = hf_model.generate(prompt, max_new_tokens=3, do_sample=False, suppress_tokens=None)
    assert unsuppressed[0, 1:].tolist() == [50300] * 3  # the trap works
    generated = hf_model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert generated[0, 1:].max().item() < GPT2_VOCAB_SIZE


def test_missing_checkpoint_is_one_line_from_the_real_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "export.py"), f"--out_dir={tmp_path / 'nothing'}",
         f"--export_dir={tmp_path / 'hf'}"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert_one_line_error(result.returncode, result.stderr, "not found")
    assert os.listdir(tmp_path) == []


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / ckpt.FILENAME).write_bytes(b"not a checkpoint")
    status, stderr = run_export(monkeypatch, capsys, f"--out_dir={out_dir}", f"--export_dir={tmp_path / 'hf'}")
    assert_one_line_error(status, stderr, "corrupt")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    status, stderr = run_export(monkeypatch, capsys, f"--out_dir={out_dir}", f"--export_dir={a_file}")
    assert_one_line_error(status, stderr, "not a folder")
    status, stderr = run_export(monkeypatch, capsys, f"--out_dir={out_dir}", "--overwrite=yes")
    assert_one_line_error(status, stderr, "overwrite")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "run"] and leftovers(tmp_path) == []


def test_refuses_a_foreign_folder_unless_overwrite(tmp_path, monkeypatch, capsys):
    write_checkpoint(tmp_path / "run", bias=False)
    foreign = tmp_path / "hf"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    args = (f"--out_dir={tmp_path / 'run'}", f"--export_dir={foreign}")
    status, stderr = run_export(monkeypatch, capsys, *args)
    assert_one_line_error(status, stderr, "--overwrite=True")
    assert os.listdir(foreign) == ["notes.txt"]
    # Not even --overwrite may replace the folder that holds the checkpoint.
    status, stderr = run_export(monkeypatch, capsys, f"--out_dir={tmp_path / 'run'}", f"--export_dir={tmp_path}",
                                "--overwrite=True")
    assert_one_line_error(status, stderr, "holds the checkpoint")
    status, _ = run_export(monkeypatch, capsys, *args, "--overwrite=True")
    assert status == 0 and "notes.txt" not in os.listdir(foreign) and "model.safetensors" in os.listdir(foreign)
    assert leftovers(tmp_path) == []


def test_failed_export_keeps_the_earlier_one_whole(exports, tmp_path, monkeypatch, capsys):
    earlier = tmp_path / "hf"
    shutil.copytree(exports[False][1], earlier)
    before = sorted(os.listdir(earlier))
    write_checkpoint(tmp_path / "run", bias=True, seed=7)

    def broken(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "save_tokenizer", broken)
    monkeypatch.setattr(sys, "argv", ["export.py", f"--out_dir={tmp_path / 'run'}", f"--export_dir={earlier}"])
    with pytest.raises(RuntimeError):
        export.main()
    assert sorted(os.listdir(earlier)) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    # An earlier export is replaced without --overwrite.
    status, _ = run_export(monkeypatch, capsys, f"--out_dir={tmp_path / 'run'}", f"--export_dir={earlier}")
    assert status == 0 and sorted(os.listdir(earlier)) == before and leftovers(tmp_path) == []


def test_files_the_user_added_to_an_earlier_export_are_never_deleted(exports, tmp_path, monkeypatch, capsys):
    earlier = tmp_path / "hf"
    shutil.copytree(exports[False][1], earlier)
    record = json.loads((earlier / export.PROVENANCE_FILE).read_text(encoding="utf-8"))
    assert record["files"] == sorted(os.listdir(exports[False][1]))  # an export lists what it wrote
    (earlier / "README.md").write_text("my model card")
    write_checkpoint(tmp_path / "run", bias=True, seed=7)
    args = (f"--out_dir={tmp_path / 'run'}", f"--export_dir={earlier}")
    status, stderr = run_export(monkeypatch, capsys, *args)
    assert_one_line_error(status, stderr, "holds files it did not write (README.md)", "--overwrite=True")
    assert (earlier / "README.md").read_text() == "my model card" and leftovers(tmp_path) == []
    # an export from before the list was kept: the files such an export wrote are known
    del record["files"]
    (earlier / export.PROVENANCE_FILE).write_text(json.dumps(record), encoding="utf-8")
    status, stderr = run_export(monkeypatch, capsys, *args)
    assert_one_line_error(status, stderr, "README.md")
    (earlier / "README.md").unlink()
    status, _ = run_export(monkeypatch, capsys, *args)
    assert status == 0 and "files" in json.loads((earlier / export.PROVENANCE_FILE).read_text(encoding="utf-8"))


def test_an_export_dir_that_cannot_be_written_is_one_line(tmp_path, read_only_folder, monkeypatch, capsys):
    write_checkpoint(tmp_path / "run", bias=False)
    status, stderr = run_export(monkeypatch, capsys, f"--out_dir={tmp_path / 'run'}", f"--export_dir={read_only_folder / 'hf'}")
    assert_one_line_error(status, stderr, "could not write the export to", "nothing there was replaced")
    status, stderr = run_export(monkeypatch, capsys, "--out_dir=")
    assert_one_line_error(status, stderr, "--out_dir is empty")


def test_a_full_disk_during_the_export_is_one_line_and_leaves_nothing(tmp_path, mount_tmpfs, monkeypatch, capsys):
    write_checkpoint(tmp_path / "run", bias=False)
    disk = mount_tmpfs("2m")  # the tiny model's weights alone take 3.2 MB
    status, stderr = run_export(monkeypatch, capsys, f"--out_dir={tmp_path / 'run'}", f"--export_dir={disk / 'hf'}")
    assert_one_line_error(status, stderr, "could not write the export to", "No space left on device", "MB free there")
    assert os.listdir(disk) == [".hf.lock"]  # only the lock, which stays beside the folder (folder_lock.py)
    status, stderr = run_export(monkeypatch, capsys, f"--out_dir={tmp_path / 'run'}", f"--export_dir={disk}")
    assert_one_line_error(status, stderr, "is a mount point, which export.py would replace whole; give a folder inside it")


# ---- never lose a folder: the one you work in, your home, a kill at any moment, a symlink ----

def tree_checksums(root):
    """{path relative to root: sha256} of every file under root, hidden ones included, without the
    lock files an export leaves beside its folder (folder_lock.py)."""
    sums = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".lock"):
                with open(path, "rb") as f:
                    sums[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return sums


def test_the_current_folder_its_parents_and_home_are_never_replaced(tmp_path):
    """--export_dir=. --overwrite=True once replaced the folder the user stood in (their thesis with it)."""
    write_checkpoint(tmp_path / "runs" / "run", bias=False)
    work = tmp_path / "work" / "thesis"
    (work / "sub").mkdir(parents=True)
    (work / "thesis.txt").write_text("three years of it")
    (work / "sub" / "code.py").write_text("print('mine')\n")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("export PATH\n")
    before = tree_checksums(tmp_path)
    for export_dir, words in ((".", "--export_dir=. is the current folder"), ("..", "--export_dir=.. holds the current folder"),
                              (home, "is your home folder"), ("/", "--export_dir=/ holds")):
        result = run_script("export.py", f"--out_dir={tmp_path / 'runs' / 'run'}", f"--export_dir={export_dir}",
                            "--overwrite=True", cwd=work, env={"HOME": str(home)})
        assert_user_error(result, words)
    assert tree_checksums(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["home", "runs", "work"]



def test_a_folder_holding_folders_is_never_replaced_even_with_overwrite(tmp_path):
    """--export_dir=data --overwrite=True once replaced the data folder, the prepared data/mine in it."""
    write_checkpoint(tmp_path / "run", bias=False)
    data = tmp_path / "data"
    (data / "mine").mkdir(parents=True)
    (data / "mine" / "train.bin").write_bytes(b"tokens")
    before = tree_checksums(tmp_path / "data")
    result = run_script("export.py", f"--out_dir={tmp_path / 'run'}", f"--export_dir={data}", "--overwrite=True")
    assert_user_error(result, "holds folders (mine)", "--export_dir=hf-mine")
    assert tree_checksums(tmp_path / "data") == before


@pytest.mark.parametrize("files", [["ckpt.pt", "metrics.jsonl"], ["meta.json", "train.bin", "val.bin"]])
def test_a_run_or_a_data_folder_is_never_replaced_even_with_overwrite(tmp_path, files):
    """--out_dir and --export_dir swapped: the message must not advise the flag that deletes a run."""
    write_checkpoint(tmp_path / "run", bias=False)
    other = tmp_path / "other"
    other.mkdir()
    for name in files:
        (other / name).write_bytes(b"precious")
    before = tree_checksums(other)
    for overwrite in ([], ["--overwrite=True"]):
        result = run_script("export.py", f"--out_dir={tmp_path / 'run'}", f"--export_dir={other}", *overwrite)
        assert_user_error(result, f"holds a training run or its data ({', '.join(sorted(files))})", "even with --overwrite=True")
    assert tree_checksums(other) == before

PAUSED_EXPORT = """
import os, sys, time
import export
from opengpt import cli

def pause():
    open(os.environ["PAUSED_FLAG"], "w").close()
    while not os.path.exists(os.environ["GO_FLAG"]):
        time.sleep(0.02)

if os.environ["PAUSE_AT"] == "writing":  # the new folder half written
    save_provenance = export.save_provenance
    def paused_provenance(*args):
        save_provenance(*args)
        pause()
    export.save_provenance = paused_provenance
else:  # "swap": right after the first of the two renames, which moves the earlier export away
    rename, export_dir = os.rename, os.path.realpath(os.environ["EXPORT_DIR"])
    def paused_rename(source, destination):
        rename(source, destination)
        if os.path.realpath(source) == export_dir:
            pause()
    os.rename = paused_rename
sys.argv[0] = "export.py"
cli.run(export.main)
"""


def start_paused_export(tmp_path, pause_at, run, export_dir):
    """A real export.py run that stops at pause_at until the returned go-file exists, so that a test
    signals it at that moment without racing it."""
    flags = tmp_path / "flags"
    flags.mkdir(exist_ok=True)
    paused, go = flags / "paused", flags / "go"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PAUSED_FLAG=str(paused), GO_FLAG=str(go),
               PAUSE_AT=pause_at, EXPORT_DIR=str(export_dir))
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_EXPORT, f"--out_dir={run}", f"--export_dir={export_dir}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(6000):
        if paused.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert paused.exists(), proc.communicate(timeout=60)
    return proc, go


def exported_from(folder):
    """The checkpoint an export was made from; and every file its record lists is there."""
    record = json.loads((folder / export.PROVENANCE_FILE).read_text(encoding="utf-8"))
    assert sorted(os.listdir(folder)) == record["files"]
    return record["checkpoint"]


@pytest.fixture
def earlier_export(exports, tmp_path):
    """(an earlier export in its own folder, the checksums of that folder, a new run to export)."""
    earlier = tmp_path / "exports" / "hf"
    shutil.copytree(exports[False][1], earlier)
    write_checkpoint(tmp_path / "run", bias=True, seed=7)
    return earlier, tree_checksums(earlier.parent), tmp_path / "run"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_export_stopped_while_writing_leaves_the_earlier_one_and_nothing_else(earlier_export, tmp_path, sig):
    earlier, before, run = earlier_export
    proc, _ = start_paused_export(tmp_path, "writing", run, earlier)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr  # a SIGTERM once ended it at once (143), its half-written folder left
    assert stderr.strip().splitlines()[-1] == "export.py: interrupted" and "Traceback" not in stderr
    assert tree_checksums(earlier.parent) == before and leftovers(earlier.parent) == []


def test_a_sigterm_between_the_two_renames_never_leaves_the_export_dir_missing(earlier_export, tmp_path):
    """A SIGTERM once ended the export right there, export_dir missing. Now the earlier export or the
    new one is in place, whole, and nothing is left beside it."""
    earlier, before, run = earlier_export
    proc, go = start_paused_export(tmp_path, "swap", run, earlier)
    assert not earlier.exists()  # between the two renames
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    go.touch()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "export.py: interrupted", stderr
    assert exported_from(earlier) == str(run / ckpt.FILENAME) or tree_checksums(earlier.parent) == before
    assert leftovers(earlier.parent) == []


def test_a_kill_9_between_the_two_renames_is_put_right_by_the_next_export(earlier_export, tmp_path, monkeypatch, capsys):
    """kill -9 right after the earlier export was moved away left export_dir missing, and the next
    export neither put it back nor removed what was hidden beside it."""
    earlier, before, run = earlier_export
    proc, _ = start_paused_export(tmp_path, "swap", run, earlier)
    proc.kill()
    proc.communicate(timeout=60)
    assert not earlier.exists() and leftovers(earlier.parent)  # the earlier export is hidden beside it
    # the next export puts it back before anything else, so even one that fails leaves it as it was
    monkeypatch.setattr(export, "save_tokenizer", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    status, stderr = run_export(monkeypatch, capsys, f"--out_dir={run}", f"--export_dir={earlier}")
    assert_one_line_error(status, stderr, "could not write the export", "nothing there was replaced")
    assert tree_checksums(earlier.parent) == before and leftovers(earlier.parent) == []
    monkeypatch.undo()
    result = run_script("export.py", f"--out_dir={run}", f"--export_dir={earlier}")
    assert result.returncode == 0, result.stderr
    assert exported_from(earlier) == str(run / ckpt.FILENAME) and leftovers(earlier.parent) == []


def test_a_symlinked_export_dir_keeps_its_link_and_the_folder_it_points_at_is_replaced(earlier_export, tmp_path):
    earlier, _, run = earlier_export
    link = tmp_path / "latest"
    link.symlink_to(earlier)
    result = run_script("export.py", f"--out_dir={run}", f"--export_dir={link}")
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(earlier)
    assert exported_from(earlier) == str(run / ckpt.FILENAME)
    assert leftovers(tmp_path) == [] and leftovers(earlier.parent) == []
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert_user_error(run_script("export.py", f"--out_dir={run}", f"--export_dir={dangling}"), "which does not exist")
    assert not (tmp_path / "nowhere").exists()


CONVERSATIONS = [
    [{"role": "user", "content": "长江"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"}, {"role": "user", "content": "Hello 🙂, it's  me\n"},
     {"role": "assistant", "content": " 滚滚长江东逝水。"}, {"role": "user", "content": "浪花淘尽英雄？\t"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "是非成败转头空"}],  # an empty system prompt is left out
]


def test_a_chat_model_exports_our_chat_template_and_the_pipeline_takes_messages(tmp_path, offline):
    from transformers import AutoTokenizer, GenerationConfig, pipeline

    from chat_checkpoint import chat_tokenizer, write_chat_checkpoint
    from opengpt.chat_format import CHAT_TEMPLATE, IM_END, im_end_id, prompt_ids

    write_chat_checkpoint(tmp_path / "run")
    result = run_script("export.py", f"--out_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'hf'}",
                        env=dict(HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr
    assert "a list of messages" in result.stdout
    with open(tmp_path / "hf" / "tokenizer_config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["chat_template"] == CHAT_TEMPLATE and config["eos_token"] == IM_END
    ours = chat_tokenizer()
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS:
        theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert (theirs if isinstance(theirs, list) else theirs["input_ids"]) == prompt_ids(ours, messages), messages
    assert hf_tokenizer.eos_token_id == im_end_id(ours)
    assert GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == [im_end_id(ours), ours.eot_token]
    question = CONVERSATIONS[0]
    answer = pipeline("text-generation", model=str(tmp_path / "hf"))(question, max_new_tokens=4, do_sample=False)
    conversation = answer[0]["generated_text"]  # the messages given, then the model's reply
    assert conversation[:-1] == question and conversation[-1]["role"] == "assistant"
    assert isinstance(conversation[-1]["content"], str)


def test_a_rotary_model_with_attention_scaled_by_layer_exports_with_our_logits(offline):
    """GPT-NeoX has no scale_attn_by_inverse_layer_idx: the export folds 1 / (layer + 1) into the queries."""
    from opengpt.gpt_neox_format import to_neox

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, block_size=16, vocab_size=64, bias=True, rotary=True,
                          activation="relu2", scale_attn_by_inverse_layer_idx=True)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(8)  # sharp attention, where the scale shows
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.full_logits(idx)
        assert (to_neox(model, 0).eval()(idx).logits - ours).abs().max().item() < 1e-4
        model.config.scale_attn_by_inverse_layer_idx = False  # exported without the fold: the scale shows
        assert (to_neox(model, 0).eval()(idx).logits - ours).abs().max().item() > 1e-3
