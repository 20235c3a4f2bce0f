import pytest

import tokenizer


def test_gpt2_encoding_matches_known_ids_offline():
    encoding = tokenizer.gpt2_encoding()
    assert encoding.encode("Hello world") == [15496, 995]
    assert encoding.n_vocab == 50257
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_chinese_round_trips_through_bytes():
    encoding = tokenizer.gpt2_encoding()
    text = "滚滚长江东逝水，浪花淘尽英雄。１９９８年 GPT-2 😀"
    ids = encoding.encode(text)
    assert encoding.decode(ids) == text
    assert len(ids) > len(text) // 2  # GPT-2's byte-level BPE spends several tokens per CJK character


def test_ranks_with_wrong_checksum_are_refused(tmp_path):
    fake = tmp_path / "gpt2.tiktoken"
    fake.write_bytes(b"IQ== 0\n")
    with pytest.raises(ValueError, match="sha256"):
        tokenizer.load_ranks(str(fake))


def test_unknown_tokenizer_name_is_refused():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenizer.get_encoding("cl100k_base")
