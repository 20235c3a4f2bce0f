"""The chat template, in one place: ChatML, as Qwen and many others write conversations.

    <|im_start|>system\\nYou are helpful.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n

Each message is `<|im_start|>{role}\\n{content}<|im_end|>\\n`; a system message with empty content is
left out. The two markers are special tokens added to a byte-level BPE (with_chat_tokens): single
ids, inserted by the template alone; text that spells them inside a message stays text.
The ids are those Hugging Face's tokenizer gives the rendered text (export.py writes CHAT_TEMPLATE):
the text between two markers is encoded as one piece, "{role}\\n{content}", then the "\\n" (except
where a message spells a marker: Hugging Face's tokenizer takes that for the token, ours keeps it text).
The mask marks what fine-tuning learns: an assistant reply's tokens and its closing <|im_end|> (so
the model learns to stop). A token that begins inside "{role}\\n" is not the reply's, so a reply
that starts with whitespace merged into that "\\n" by the tokenizer loses that token from its mask.
"""
from opengpt.tokenizer import IM_END, IM_START, TokenizerError

CHAT_TOKENS = (IM_START, IM_END)
TEMPLATE_NAME = "chatml"
# ShareGPT's `from` values (minimind, many Chinese SFT sets) and OpenAI's roles, to ours.
ROLE_NAMES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
# Hugging Face's tokenizer_config.json "chat_template": the same text as render_conversation
# (transformers renders it with trim_blocks and lstrip_blocks; the {%- -%} make that irrelevant).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' or message['content'] | trim -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class ChatFormatError(ValueError):
    """A conversation record that cannot be used; the message names the record and the problem."""


def parse_conversation(record, where):
    """[{role, content}, ...] of a record in either form people have:
    {"messages": [{"role", "content"}, ...]} (OpenAI, Hugging Face chat datasets, TRL) or
    {"conversations": [{"from", "value"}, ...]} (ShareGPT, minimind), either with an optional
    "system" string beside the list (LLaMA-Factory). An empty system message is dropped; anything
    else that cannot be trained on is a ChatFormatError naming `where`."""
    if not isinstance(record, dict):
        raise ChatFormatError(f"{where}: a {type(record).__name__}, not an object with \"messages\" or \"conversations\"")
    key = next((key for key in ("messages", "conversations") if key in record), None)
    if key is None:
        raise ChatFormatError(f"{where}: no \"messages\" or \"conversations\" list (it has {', '.join(map(repr, list(record)[:5])) or 'no fields'})")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise ChatFormatError(f"{where}: \"{key}\" is {'empty' if turns == [] else 'a ' + type(turns).__name__}, not a list of messages")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ChatFormatError(f"{where}: \"system\" is a {type(system).__name__}, not a string")
    messages = [parse_message({"role": "system", "content": system}, f"{where}: \"system\"")] if system and system.strip() else []
    for number, turn in enumerate(turns, 1):
        message = parse_message(turn, f"{where}: message {number}")
        if message["role"] != "system" or message["content"].strip():
            messages.append(message)
    if not any(message["role"] == "assistant" for message in messages):
        raise ChatFormatError(f"{where}: no assistant message, so nothing to learn")
    if messages[-1]["role"] != "assistant":
        raise ChatFormatError(f"{where}: ends with the {messages[-1]['role']}, not the assistant; a reply to learn must end it")
    return messages


def parse_message(turn, where):
    """{role, content} of one message, {role, content} or ShareGPT's {from, value}."""
    if not isinstance(turn, dict):
        raise ChatFormatError(f"{where} is a {type(turn).__name__}, not an object with a role and a content")
    # a Hugging Face dataset that mixes both forms gives each message all four keys, the other two None
    sharegpt = turn.get("role") is None and ("from" in turn or "value" in turn)
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if role_key not in turn:
        raise ChatFormatError(f"{where} has no \"{role_key}\"")
    role = turn[role_key]
    if not isinstance(role, str) or role not in ROLE_NAMES:  # a list or object is no role (nor hashable)
        raise ChatFormatError(f"{where} has the unknown role {str(role)[:40]!r}; known: {', '.join(ROLE_NAMES)}")
    content = turn.get(content_key)
    if not isinstance(content, str):
        what = "no" if content_key not in turn else f"a {type(content).__name__} as its"
        raise ChatFormatError(f"{where} has {what} \"{content_key}\", not a string")
    if ROLE_NAMES[role] != "system" and not content.strip():
        raise ChatFormatError(f"{where} ({role}) has empty content")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\\ud800" escape makes one; no tokenizer can encode it
        raise ChatFormatError(f"{where} holds a lone surrogate ({content[e.start]!r}), which is not text") from None
    return {"role": ROLE_NAMES[role], "content": content}


def rendered_messages(messages):
    """The messages the template writes: all but an empty system message."""
    return [m for m in messages if m["role"] != "system" or m["content"].strip()]


def render_conversation(messages, add_generation_prompt=False):
    """The conversation as text, as CHAT_TEMPLATE renders it."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in rendered_messages(messages))
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def is_chat_tokenizer(tokenizer):
    return all(tokenizer.special_token_id(text) is not None for text in CHAT_TOKENS)


def im_start_id(tokenizer):
    return _chat_token_id(tokenizer, IM_START)


def im_end_id(tokenizer):
    return _chat_token_id(tokenizer, IM_END)


def _chat_token_id(tokenizer, text):
    token = tokenizer.special_token_id(text)
    if token is None:
        raise TokenizerError(f"the tokenizer has no {text} token: it is not a chat tokenizer (with_chat_tokens makes one)")
    return token


def with_chat_tokens(tokenizer):
    """The same byte-level BPE with <|im_start|> and <|im_end|> as special tokens, ids n_vocab and
    n_vocab + 1 of the tokenizer given; one that has them already is returned as it is."""
    if is_chat_tokenizer(tokenizer):
        return tokenizer
    if tokenizer.kind != "bpe":
        raise TokenizerError(f"chat fine-tuning needs a tokenizer.json tokenizer; the {tokenizer.kind} tokenizer cannot take "
                             f"new tokens here: start from a model trained on data prepared with --tokenizer=bpe "
                             f"(the default), or from a transformers folder that holds a tokenizer.json")
    chat = tokenizer.with_special_tokens(CHAT_TOKENS)
    ids = [chat.special_token_id(text) for text in CHAT_TOKENS]
    if ids != [tokenizer.n_vocab, tokenizer.n_vocab + 1] or chat.n_vocab != tokenizer.n_vocab + 2:
        raise TokenizerError(f"adding {' and '.join(CHAT_TOKENS)} to the tokenizer gave ids {ids}, not the next two "
                             f"after its {tokenizer.n_vocab} tokens (it spells one of them as ordinary text, or has gaps in its ids)")
    return chat


def encode_conversation(tokenizer, messages):
    """(ids, mask) of the rendered conversation: mask[i] is 1 where token i is part of an assistant
    reply or the <|im_end|> that closes it, 0 elsewhere."""
    return encode_conversations(tokenizer, [messages])[0]


def encode_conversations(tokenizer, conversations):
    """encode_conversation of each conversation, the text of all of them encoded in one batch
    (Hugging Face tokenizers spreads a batch over the CPU's threads)."""
    start, end = im_start_id(tokenizer), im_end_id(tokenizer)
    newline = tokenizer.encode("\n")
    kept = [rendered_messages(messages) for messages in conversations]
    pieces = tokenizer.encode_batch([f"{m['role']}\n{m['content']}" for messages in kept for m in messages])
    token_bytes = tokenizer.token_bytes
    encoded, next_piece = [], iter(pieces)
    for messages in kept:
        ids, mask = [], []
        for message in messages:
            piece = next(next_piece)
            ids += [start, *piece, end, *newline]
            reply = message["role"] == "assistant"
            header = reply_start(piece, len(message["role"]) + 1, token_bytes) if reply else len(piece)
            mask += [0] * (1 + header) + [1] * (len(piece) - header) + [int(reply)] + [0] * len(newline)
        encoded.append((ids, mask))
    return encoded


def message_lengths(tokenizer, messages):
    """How many of encode_conversation's ids each message takes (0 for an empty system message, which the
    template leaves out): a message's ids do not depend on its neighbours', so a conversation's are their sum."""
    kept = rendered_messages(messages)
    pieces, rendered = iter(tokenizer.encode_batch([f"{m['role']}\n{m['content']}" for m in kept])), {id(m) for m in kept}
    frame = 2 + len(tokenizer.encode("\n"))  # <|im_start|>, <|im_end|>, the newline after it
    return [frame + len(next(pieces)) if id(m) in rendered else 0 for m in messages]


def reply_start(piece, header_bytes, token_bytes):
    """The index of the first token of piece ("{role}\\n{content}") that starts at or after the
    header's header_bytes bytes: the first of the reply's own tokens."""
    index, offset = 0, 0
    while index < len(piece) and offset < header_bytes:
        offset += len(token_bytes[piece[index]])
        index += 1
    return index


def prompt_ids(tokenizer, messages):
    """The ids generation continues: the conversation (ending with the user's turn), then
    <|im_start|>assistant\\n, as CHAT_TEMPLATE renders with add_generation_prompt."""
    ids, _ = encode_conversation(tokenizer, messages)
    return ids + [im_start_id(tokenizer), *tokenizer.encode("assistant\n")]
