"""prepare_chat.py: conversations to token files, masks and meta.json, checked against a hand count."""
import gzip
import json
import os
import shutil

import numpy as np
import pytest

from conftest import REPO, assert_user_error, run_script, tiny_documents
from opengpt import chat_format as cf
from opengpt import tokenizer as tok
from opengpt.chat_format import IM_END

SAMPLE = os.path.join(REPO, "tests", "chat_sample.jsonl")  # 6 conversations, both record forms
SPLIT_FLAGS = ("--min_val_conversations=2",)
OUTPUT_FILES = ["meta.json", "tokenizer.json", "train.bin", "train_mask.bin", "val.bin", "val_mask.bin"]


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A folder holding a small trained tokenizer.json, as a pretraining data folder does."""
    folder = tmp_path_factory.mktemp("base")
    base = tok.train_bpe(tiny_documents(300, seed=0) + ["What does it mean? It ends a turn."] * 3, 400)
    (folder / "tokenizer.json").write_text(base.json_text, encoding="utf-8")
    return folder


def sample_conversations():
    with open(SAMPLE, encoding="utf-8") as f:
        return [cf.parse_conversation(json.loads(line), "sample") for line in f]


def prepare_chat_ok(*args):
    result = run_script("prepare_chat.py", *args)
    assert result.returncode == 0, result.stderr
    return result


def split_documents(ids, mask, eot):
    """(ids, mask) of each document of a split: the tokens up to each <|endoftext|>."""
    documents, start = [], 0
    for end in np.flatnonzero(ids == eot):
        documents.append((ids[start:end].tolist(), mask[start:end].tolist()))
        assert mask[end] == 0
        start = end + 1
    assert start == len(ids), "every conversation ends with <|endoftext|>"
    return documents


def read_folder(out):
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    tokenizer = tok.read_tokenizer_file(str(out))
    splits = {}
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.dtype(meta["dtype"]))
        mask = np.fromfile(out / f"{split}_mask.bin", dtype=np.uint8)
        assert len(ids) == len(mask) == meta["splits"][split]["tokens"]
        splits[split] = split_documents(ids, mask, tokenizer.eot_token)
    return meta, tokenizer, splits


def test_files_masks_and_meta_match_a_hand_count(tmp_path, base_folder):
    out = tmp_path / "chat"
    result = prepare_chat_ok(f"--input={SAMPLE}", f"--tokenizer_from={base_folder}", f"--out={out}", *SPLIT_FLAGS)
    assert sorted(os.listdir(out)) == OUTPUT_FILES
    meta, tokenizer, splits = read_folder(out)
    base = tok.read_tokenizer_file(str(base_folder))
    assert tokenizer.json_text == cf.with_chat_tokens(base).json_text
    assert meta["vocab_size"] == meta["tokenizer"]["vocab_size"] == base.n_vocab + 2 and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == dict(kind="bpe", vocab_size=402, sha256=tokenizer.sha256, file="tokenizer.json")
    assert meta["chat"] == dict(template="chatml", base_vocab_size=400, base_sha256=base.sha256,
                                conversations=dict(train=4, val=2), skipped=0)
    conversations = sample_conversations()
    rendered = {cf.render_conversation(messages): messages for messages in conversations}
    seen = []
    for split, documents in splits.items():
        counts = dict(documents=0, characters=0, bytes=0, tokens=0, assistant_tokens=0)
        assert len(documents) == meta["chat"]["conversations"][split]
        for ids, mask in documents:
            messages = rendered[tokenizer.decode(ids)]  # each document is one conversation, rendered
            seen.append(tokenizer.decode(ids))
            replies = [m["content"] for m in messages if m["role"] == "assistant"]
            masked = tokenizer.decode([t for t, m in zip(ids, mask) if m])
            assert masked == "".join(reply + IM_END for reply in replies)
            counts["documents"] += len(replies)
            counts["characters"] += sum(map(len, replies))
            counts["bytes"] += sum(len(reply.encode("utf-8")) for reply in replies)
            counts["tokens"] += len(ids) + 1  # and its <|endoftext|>
            counts["assistant_tokens"] += sum(mask)
            # the bytes masked bits per byte divide by: the replies' and one per <|im_end|> (data.bytes_per_character)
            assert sum(tokenizer.token_byte_lengths[t] for t, m in zip(ids, mask) if m) == \
                sum(len(reply.encode("utf-8")) + 1 for reply in replies)
        assert meta["splits"][split] == counts
        assert f"{split}: {len(documents)} conversations, {counts['characters']} assistant characters, " \
               f"{counts['tokens']} tokens, {counts['assistant_tokens']} assistant tokens" in result.stdout
    assert sorted(seen) == sorted(rendered)  # every conversation once, in one split
    hand_count = {"documents": 8, "characters": sum(len(m["content"]) for c in conversations for m in c if m["role"] == "assistant")}
    assert sum(meta["splits"][s]["documents"] for s in splits) == hand_count["documents"]
    assert sum(meta["splits"][s]["characters"] for s in splits) == hand_count["characters"]


def test_two_runs_write_the_same_bytes_and_a_folder_of_jsonl_json_and_jsonl_gz_the_same_tokens(tmp_path, base_folder):
    records = [json.loads(line) for line in open(SAMPLE, encoding="utf-8")]
    folder = tmp_path / "sft"
    (folder / "part").mkdir(parents=True)
    (folder / "a.jsonl").write_text("\r\n".join(json.dumps(r) for r in records[:3]), encoding="utf-8-sig")  # Windows Notepad's
    (folder / "b.json").write_text(json.dumps(records[3:5], ensure_ascii=False, indent=1), encoding="utf-8")
    with gzip.open(folder / "part" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(json.dumps(r) for r in records[5:]) + "\n")
    (folder / "notes.txt").write_text("not read", encoding="utf-8")
    outs = [tmp_path / name for name in ("one", "two", "folder")]
    for out, source in zip(outs, (SAMPLE, SAMPLE, folder)):
        prepare_chat_ok(f"--input={source}", f"--tokenizer_from={base_folder}", f"--out={out}", *SPLIT_FLAGS)
    for name in OUTPUT_FILES:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
        if name != "meta.json":  # which records only the source differently
            assert (outs[0] / name).read_bytes() == (outs[2] / name).read_bytes(), name


def test_a_bad_record_is_named_and_nothing_written_or_with_the_flag_skipped_and_counted(tmp_path, base_folder):
    lines = open(SAMPLE, encoding="utf-8").read().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes("\n".join(lines[:2] + ['{"messages": [{"role": "user", "content": "hi"}]}', "{not json"]).encode()
                    + b"\n\xff\xfe\n" + "\n".join(lines[2:]).encode() + b"\n")
    out = tmp_path / "out"
    args = [f"--input={bad}", f"--tokenizer_from={base_folder}", f"--out={out}", *SPLIT_FLAGS]
    result = run_script("prepare_chat.py", *args)
    assert_user_error(result, f"{bad}:3: no assistant message", "--skip_bad_records=True")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == [".out.lock", "bad.jsonl"]  # no staging folder left
    result = prepare_chat_ok(*args, "--skip_bad_records=True")
    assert "skipped 3 bad records" in result.stdout
    meta, _, splits = read_folder(out)
    assert meta["chat"]["skipped"] == 3 and sum(meta["chat"]["conversations"].values()) == 6


@pytest.mark.parametrize("content, words", [
    (b'{"messages": []}\n', ":1: \"messages\" is empty"),
    (b'[{"messages": [{"role": "user", "content": "hi"}, {"role": "gpt4", "content": "x"}]}]', "record 1: message 2 has the unknown role 'gpt4'"),
    (b"\xff\n", ":1 is not UTF-8 text (bad byte 0xff at byte 0 of the line)"),
    (b'{"text": 1', ":1 is not valid JSON"),
    (b"\n\n", "no conversations found"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "only 1 conversation found"),
    (b'{"messages": [{"role": ["user"], "content": "hi"}, {"role": "assistant", "content": "x"}]}', "message 1 has the unknown role \"['user']\""),
    (b'{"conversations": [{"from": {"a": 1}, "value": "hi"}]}', "has the unknown role \"{'a': 1}\""),
])
def test_unusable_input_is_one_line(tmp_path, base_folder, content, words):
    path = tmp_path / ("chats.json" if content.startswith(b"[") else "chats.jsonl")
    path.write_bytes(content)
    result = run_script("prepare_chat.py", f"--input={path}", f"--tokenizer_from={base_folder}", f"--out={tmp_path / 'out'}")
    assert_user_error(result, words)
    assert not (tmp_path / "out").exists()


def test_the_tokenizer_of_a_runs_checkpoint_is_read_and_gpt2s_refused(tmp_path, base_folder):
    import torch

    from opengpt import checkpoint as ckpt

    base = tok.read_tokenizer_file(str(base_folder))
    for name, spec in (("run", base.spec), ("gpt2_run", {"kind": "gpt2"})):
        (tmp_path / name).mkdir()
        torch.save({"format": ckpt.FORMAT, "tokenizer": spec}, tmp_path / name / ckpt.FILENAME)
    out = tmp_path / "chat"
    prepare_chat_ok(f"--input={SAMPLE}", f"--tokenizer_from={tmp_path / 'run'}", f"--out={out}", *SPLIT_FLAGS)
    assert json.loads((out / "meta.json").read_text())["chat"]["base_sha256"] == base.sha256
    result = run_script("prepare_chat.py", f"--input={SAMPLE}", f"--tokenizer_from={tmp_path / 'gpt2_run'}", f"--out={tmp_path / 'x'}")
    assert_user_error(result, "chat fine-tuning needs a tokenizer.json tokenizer")
    result = run_script("prepare_chat.py", f"--input={SAMPLE}", f"--tokenizer_from={tmp_path}", f"--out={tmp_path / 'x'}")
    assert_user_error(result, "holds neither tokenizer.json nor ckpt.pt")
    assert not (tmp_path / "x").exists()
    prepare_chat_ok(f"--input={SAMPLE}", f"--tokenizer_from={tmp_path / 'run' / ckpt.FILENAME}", f"--out={out}", *SPLIT_FLAGS)
    assert json.loads((out / "meta.json").read_text())["chat"]["base_sha256"] == base.sha256  # the checkpoint named itself


def test_a_data_folder_of_gpt2_tokens_is_refused_for_its_tokenizer(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(tiny_documents(50)), encoding="utf-8")
    assert run_script("prepare.py", f"--input={source}", f"--out={tmp_path / 'gpt2'}", "--tokenizer=gpt2").returncode == 0
    result = run_script("prepare_chat.py", f"--input={SAMPLE}", f"--tokenizer_from={tmp_path / 'gpt2'}", f"--out={tmp_path / 'x'}")
    assert_user_error(result, "the gpt2 tokenizer cannot take new tokens")
    assert not (tmp_path / "x").exists()


def test_a_pretraining_data_folder_is_not_replaced(tmp_path, base_folder):
    """prepare.py's folders have the file names of a chat folder: meta.json tells them apart. Giving
    the pretraining folder as --out (its own --tokenizer_from, say) must not replace its data."""
    source = tmp_path / "in.txt"
    source.write_text("\n".join(tiny_documents(300)), encoding="utf-8")
    pretraining = tmp_path / "pre"
    assert run_script("prepare.py", f"--input={source}", f"--out={pretraining}", "--vocab_size=300").returncode == 0
    before = {p.name: p.read_bytes() for p in pretraining.iterdir()}
    result = run_script("prepare_chat.py", f"--input={SAMPLE}", f"--tokenizer_from={pretraining}", f"--out={pretraining}")
    assert_user_error(result, "holds a folder of pretraining data (its meta.json records no conversations)")
    assert {p.name: p.read_bytes() for p in pretraining.iterdir()} == before
    chat = tmp_path / "chat"
    for _ in range(2):  # a chat folder is replaced by the next run
        prepare_chat_ok(f"--input={SAMPLE}", f"--tokenizer_from={pretraining}", f"--out={chat}", *SPLIT_FLAGS)


def test_a_folder_prepare_chat_did_not_write_is_refused(tmp_path, base_folder):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("mine", encoding="utf-8")
    result = run_script("prepare_chat.py", f"--input={SAMPLE}", f"--tokenizer_from={base_folder}", f"--out={out}")
    assert_user_error(result, "holds files prepare_chat.py did not write (notes.md)")
    assert os.listdir(out) == ["notes.md"]


def test_hugging_face_dataset_from_a_local_folder(tmp_path, base_folder):
    pytest.importorskip("datasets", reason="datasets is in requirements-test.txt")
    folder = tmp_path / "hf_chats"
    folder.mkdir()
    # datasets reads the messages as a column of lists; ShareGPT rows go in a dataset of their own
    lines = [line for line in open(SAMPLE, encoding="utf-8") if '"messages"' in line]
    lines[1] = json.dumps(json.loads(lines[1]) | {"system": "回答要简短。"}, ensure_ascii=False) + "\n"  # beside the turns
    (folder / "train.jsonl").write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "out"
    prepare_chat_ok(f"--hf_dataset={folder}", f"--tokenizer_from={base_folder}", f"--out={out}", *SPLIT_FLAGS)
    _, tokenizer, splits = read_folder(out)
    texts = sorted(tokenizer.decode(ids) for documents in splits.values() for ids, _ in documents)
    expected = sorted(cf.render_conversation(cf.parse_conversation(json.loads(line), "x")) for line in lines)
    assert texts == expected
    shutil.rmtree(folder)
