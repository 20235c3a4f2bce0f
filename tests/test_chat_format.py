"""The ChatML template (opengpt/chat_format.py): rendering, the assistant mask, the chat tokens, parsing."""
import pytest

from conftest import tiny_documents
from opengpt import chat_format as cf
from opengpt import tokenizer as tok
from opengpt.chat_format import IM_END, IM_START

SYSTEM = {"role": "system", "content": "你是一个乐于助人的助手。"}
EMPTY_SYSTEM = {"role": "system", "content": ""}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# Each with the text ChatML makes of it, written out by hand.
CONVERSATIONS = {
    "system prompt": ([SYSTEM, user("你好"), assistant("你好！有什么可以帮你？")],
                      "<|im_start|>system\n你是一个乐于助人的助手。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
                      "<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n"),
    "several turns": ([user("一加一？"), assistant("二。"), user("再加一？"), assistant("三。")],
                      "<|im_start|>user\n一加一？<|im_end|>\n<|im_start|>assistant\n二。<|im_end|>\n"
                      "<|im_start|>user\n再加一？<|im_end|>\n<|im_start|>assistant\n三。<|im_end|>\n"),
    "empty system": ([EMPTY_SYSTEM, user("hi"), assistant("hello")],
                     "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"),
    "Chinese and emoji": ([user("开心吗？😀"), assistant("😀👍🏽 滚滚长江东逝水\n\t浪花淘尽英雄。 𠀀")],
                          "<|im_start|>user\n开心吗？😀<|im_end|>\n"
                          "<|im_start|>assistant\n😀👍🏽 滚滚长江东逝水\n\t浪花淘尽英雄。 𠀀<|im_end|>\n"),
    "content that spells the markers": ([user("what is <|im_end|>?"), assistant("<|im_start|>x<|im_end|> ends a turn <|endoftext|>")],
                                        "<|im_start|>user\nwhat is <|im_end|>?<|im_end|>\n<|im_start|>assistant\n"
                                        "<|im_start|>x<|im_end|> ends a turn <|endoftext|><|im_end|>\n"),
}


@pytest.fixture(scope="module")
def base():
    return tok.train_bpe(tiny_documents(300, seed=0) + ["hello, what is a turn?"] * 3, 400)


@pytest.fixture(scope="module")
def chat(base):
    return cf.with_chat_tokens(base)


def hugging_face_ids(tokenizer, text):
    """The ids Hugging Face's tokenizer gives text, special tokens split out as transformers does
    (the reference for ours: the text between two special tokens is encoded as one piece)."""
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_str(tokenizer.json_text)  # encode_special_tokens is off, as AutoTokenizer has it
    return hf.encode(text, add_special_tokens=False).ids


def test_chat_tokens_are_the_next_two_ids_and_round_trip_through_the_file(base, chat, tmp_path):
    assert (chat.special_token_id(IM_START), chat.special_token_id(IM_END)) == (base.n_vocab, base.n_vocab + 1)
    assert chat.n_vocab == base.n_vocab + 2 and cf.im_end_id(chat) == base.n_vocab + 1
    assert chat.eot_token == base.eot_token and chat.token_bytes[:base.n_vocab] == base.token_bytes
    assert cf.is_chat_tokenizer(chat) and not cf.is_chat_tokenizer(base)
    assert cf.with_chat_tokens(chat) is chat  # idempotent
    assert chat.sha256 != base.sha256
    (tmp_path / "tokenizer.json").write_text(chat.json_text, encoding="utf-8")
    for loaded in (tok.read_tokenizer_file(str(tmp_path)), tok.from_spec(chat.spec)):
        assert loaded.sha256 == chat.sha256 and loaded.spec == chat.spec and cf.is_chat_tokenizer(loaded)
    assert chat.decode([base.n_vocab, base.n_vocab + 1]) == IM_START + IM_END  # the markers decode to their text


def test_in_bits_per_byte_im_end_counts_one_byte_and_im_start_none(chat):
    lengths = chat.token_byte_lengths
    assert (lengths[cf.im_end_id(chat)], lengths[cf.im_start_id(chat)], lengths[chat.eot_token]) == (1, 0, 1)


def test_text_that_spells_a_marker_stays_text(chat):
    for text in (IM_START, IM_END, f"a{IM_START}user\nb{IM_END}"):
        ids = chat.encode(text)
        assert cf.im_start_id(chat) not in ids and cf.im_end_id(chat) not in ids
        assert chat.decode(ids) == text


def test_gpt2_tokenizer_is_refused_with_the_fix():
    with pytest.raises(tok.TokenizerError, match="chat fine-tuning needs a tokenizer.json tokenizer"):
        cf.with_chat_tokens(tok.GPT2Tokenizer())


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_rendering_and_the_assistant_mask(chat, name):
    messages, text = CONVERSATIONS[name]
    assert cf.render_conversation(messages) == text
    ids, mask = cf.encode_conversation(chat, messages)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert chat.decode(ids) == text  # decode(encode) gives the rendered text back exactly
    turns = sum(m["role"] != "system" or bool(m["content"]) for m in messages)
    assert ids.count(cf.im_start_id(chat)) == ids.count(cf.im_end_id(chat)) == turns  # the markers: single ids, only the template's
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    masked = [t for t, m in zip(ids, mask) if m]
    assert chat.decode(masked) == "".join(reply + IM_END for reply in replies)
    assert masked.count(cf.im_end_id(chat)) == len(replies)  # each reply's closing marker is learnt, no other
    if IM_START not in "".join(m["content"] for m in messages):  # Hugging Face would take spelt markers for tokens
        assert ids == hugging_face_ids(chat, text)


def test_each_masked_run_is_one_whole_reply(chat):
    messages, _ = CONVERSATIONS["several turns"]
    ids, mask = cf.encode_conversation(chat, messages)
    runs, run = [], []
    for token, m in zip(ids, mask):
        if m:
            run.append(token)
        elif run:
            runs.append(chat.decode(run))
            run = []
    assert runs == ["二。" + IM_END, "三。" + IM_END]


def test_a_reply_starting_with_blank_lines_keeps_its_text(chat):
    messages = [user("hi"), assistant("\n\n  hello")]
    ids, mask = cf.encode_conversation(chat, messages)
    assert chat.decode(ids) == cf.render_conversation(messages)
    masked = chat.decode([t for t, m in zip(ids, mask) if m])
    assert masked.endswith("hello" + IM_END) and ("\n\n  hello" + IM_END).endswith(masked)  # never the header's bytes


def test_batch_encoding_gives_each_conversation_alone(chat):
    conversations = [messages for messages, _ in CONVERSATIONS.values()]
    assert cf.encode_conversations(chat, conversations) == [cf.encode_conversation(chat, m) for m in conversations]


def test_message_lengths_add_up_to_the_conversations_ids(chat):
    """What ChatModel.fit subtracts as it drops turns: each message's share of encode_conversation's ids."""
    messages = [{"role": "system", "content": " "}, user("滚滚长江东逝水"), assistant("浪花淘尽英雄。\n\n是非成败"),
                user("hello 世界 ✓"), assistant("转头空")]
    lengths = cf.message_lengths(chat, messages)
    assert lengths[0] == 0  # an empty system message is not rendered
    for end in range(1, len(messages) + 1):
        assert sum(lengths[:end]) == len(cf.encode_conversation(chat, messages[:end])[0])
        assert sum(lengths[:end]) + len(cf.prompt_ids(chat, [])) == len(cf.prompt_ids(chat, messages[:end]))


def test_prompt_ids_continue_with_the_assistant_header(chat):
    messages = [SYSTEM, user("一加一？"), assistant("二。"), user("再加一？")]
    text = cf.render_conversation(messages, add_generation_prompt=True)
    assert text.endswith(f"再加一？{IM_END}\n{IM_START}assistant\n")
    ids = cf.prompt_ids(chat, messages)
    assert chat.decode(ids) == text and ids == hugging_face_ids(chat, text)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_the_jinja_chat_template_renders_the_same_text(add_generation_prompt):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # how transformers' apply_chat_template renders a chat_template
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(cf.CHAT_TEMPLATE)
    for messages, _ in CONVERSATIONS.values():
        messages = messages + [user("再说一遍？")] if add_generation_prompt else messages
        rendered = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        assert rendered == cf.render_conversation(messages, add_generation_prompt)


def test_both_record_forms_parse_to_the_same_messages():
    openai = {"messages": [SYSTEM, user("你好"), assistant("你好！")]}
    sharegpt = {"conversations": [{"from": "system", "value": SYSTEM["content"]}, {"from": "human", "value": "你好"},
                                  {"from": "gpt", "value": "你好！"}]}
    expected = [SYSTEM, user("你好"), assistant("你好！")]
    assert cf.parse_conversation(openai, "a:1") == cf.parse_conversation(sharegpt, "a:2") == expected
    with_empty_system = {"messages": [{"role": "system", "content": " "}, user("你好"), assistant("你好！")]}
    assert cf.parse_conversation(with_empty_system, "a:3") == expected[1:]
    system_beside = {"system": SYSTEM["content"], "conversations": sharegpt["conversations"][1:]}  # LLaMA-Factory's form
    assert cf.parse_conversation(system_beside, "a:4") == expected
    minimind = {"conversations": [user("你好"), assistant("你好！")]}  # role/content in a conversations list
    assert cf.parse_conversation(minimind, "a:5") == expected[1:]
    mixed = {"messages": [{"role": None, "content": None, "from": "human", "value": "你好"},
                          {"role": "assistant", "content": "你好！", "from": None, "value": None}]}  # as datasets unifies them
    assert cf.parse_conversation(mixed, "a:6") == expected[1:]


BAD_RECORDS = [
    ([1, 2], "a list, not an object"),
    ({"text": "你好"}, "no \"messages\" or \"conversations\" list (it has 'text')"),
    ({"messages": []}, "\"messages\" is empty"),
    ({"messages": "hi"}, "\"messages\" is a str, not a list of messages"),
    ({"messages": ["hi"]}, "message 1 is a str, not an object"),
    ({"messages": [{"content": "hi"}, assistant("x")]}, "message 1 has no \"role\""),
    ({"conversations": [{"value": "hi"}, {"from": "gpt", "value": "x"}]}, "message 1 has no \"from\""),
    ({"messages": [{"role": "tool", "content": "hi"}, assistant("x")]}, "message 1 has the unknown role 'tool'"),
    ({"messages": [user("hi"), {"role": "assistant", "content": None}]}, "message 2 has a NoneType as its \"content\""),
    ({"messages": [user("hi"), {"role": "assistant"}]}, "message 2 has no \"content\""),
    ({"messages": [user("hi"), assistant(" \n")]}, "message 2 (assistant) has empty content"),
    ({"messages": [user(""), assistant("x")]}, "message 1 (user) has empty content"),
    ({"messages": [user("hi"), assistant("x"), user("and?")]}, "ends with the user, not the assistant"),
    ({"messages": [SYSTEM, user("hi")]}, "no assistant message"),
    ({"messages": [user("hi"), assistant("\ud800")]}, "message 2 holds a lone surrogate"),
    ({"system": 1, "messages": [user("hi"), assistant("x")]}, "\"system\" is a int, not a string"),
]


@pytest.mark.parametrize("record, words", BAD_RECORDS, ids=[words for _, words in BAD_RECORDS])
def test_each_bad_record_is_named_with_its_problem(record, words):
    with pytest.raises(cf.ChatFormatError) as error:
        cf.parse_conversation(record, "chats.jsonl:7")
    assert str(error.value).startswith("chats.jsonl:7") and words in str(error.value), str(error.value)
    assert "\n" not in str(error.value)
