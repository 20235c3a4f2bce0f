"""chat.py and opengpt/chat_model.py: the conversation is kept and fitted into the model's context
(oldest messages dropped, never the system prompt), replies stream as whole UTF-8 characters and end
at <|im_end|>, Ctrl-C stops a reply or ends the chat without a traceback, a base model is one line."""
import os
import signal
import subprocess
import sys
import time

import pytest

import chat
from chat_checkpoint import SAMPLING_ARGS, write_chat_checkpoint
from conftest import REPO, assert_user_error, run_script
from opengpt import chat_model
from opengpt.chat_format import im_end_id, prompt_ids

SYSTEM = {"role": "system", "content": "你是一个乐于助人的助手。"}


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return write_chat_checkpoint(tmp_path_factory.mktemp("chat") / "out-chat")


@pytest.fixture(scope="module")
def loaded(chat_dir):
    return chat_model.load(str(chat_dir), device="cpu")


class ScriptedDecoder:
    """Decoder.stream's contract, yielding given tokens; raise_after: a Ctrl-C after that many."""

    def __init__(self, tokens, raise_after=None):
        self.tokens, self.raise_after, self.closed = tokens, raise_after, False

    def stream(self, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, seed=None, stop_ids=(), n_real_vocab=None):
        try:
            for number, token in enumerate(self.tokens[:max_new_tokens]):
                if number == self.raise_after:
                    raise KeyboardInterrupt
                yield token
                if token in stop_ids:
                    return
        finally:
            self.closed = True


def scripted(loaded, tokens, raise_after=None):
    """loaded with its decoder replaced by a ScriptedDecoder."""
    model = chat_model.ChatModel(loaded.model, loaded.tokenizer, "cpu", "float32")
    model.decoder = ScriptedDecoder(tokens, raise_after)
    return model


def byte_tokens(tokenizer, data):
    """The single-byte token of each byte of data: a text cut into pieces of characters."""
    table = tokenizer.token_bytes
    return [table.index(bytes([b])) for b in data]


def test_a_reply_streams_whole_characters_and_stops_at_im_end(loaded):
    tokenizer = loaded.tokenizer
    after = tokenizer.encode("after")
    tokens = byte_tokens(tokenizer, "长江🙂".encode()) + tokenizer.encode("好") + [im_end_id(tokenizer)] + after
    model = scripted(loaded, tokens)
    reply = model.reply(model.fit([{"role": "user", "content": "你好"}], 50))
    pieces = list(reply)
    assert pieces == ["长", "江", "🙂", "好"]  # each piece whole: no byte of a character is shown alone
    assert reply.finish_reason == "stop" and reply.completion_tokens == len(tokens) - len(after)


def test_a_reply_that_runs_out_of_tokens_says_length(loaded):
    tokens = loaded.tokenizer.encode("Hello 长江 🙂")
    model = scripted(loaded, tokens)
    reply = model.reply(model.fit([{"role": "user", "content": "你好"}], 3))
    text = "".join(reply)
    assert reply.finish_reason == "length" and reply.completion_tokens == 3
    assert text.encode() == loaded.tokenizer.decode_bytes(tokens[:3])


def test_fit_drops_the_oldest_turns_never_the_system_prompt(loaded):
    tokenizer = loaded.tokenizer
    turns = []
    for number in range(12):
        turns += [{"role": "user", "content": f"第{number}个问题：滚滚长江东逝水？"},
                  {"role": "assistant", "content": "浪花淘尽英雄。"}]
    messages = [SYSTEM, *turns, {"role": "user", "content": "最后的问题"}]
    fitted = loaded.fit(messages, 20)
    kept = [SYSTEM, *messages[1 + fitted.dropped:]]
    assert fitted.dropped > 0 and fitted.dropped % 2 == 0  # whole turns: the kept conversation starts with the user
    assert fitted.prompt_ids == prompt_ids(tokenizer, kept)
    assert len(fitted.prompt_ids) + 20 <= loaded.block_size  # the reply has its room
    longer = [SYSTEM, *messages[1 + fitted.dropped - 2:]]
    assert len(prompt_ids(tokenizer, longer)) + 20 > loaded.block_size  # and no more was dropped than needed
    assert fitted.max_new_tokens == 20
    many = [SYSTEM, *turns * 30, messages[-1]]  # a long history ends the same: the same prompt
    assert loaded.fit(many, 20).prompt_ids == fitted.prompt_ids


def test_fit_gives_a_long_question_what_room_is_left_and_refuses_one_that_leaves_none(loaded):
    around = len(prompt_ids(loaded.tokenizer, [{"role": "user", "content": "x"}])) - 1  # "x": one token, as every letter here
    question = {"role": "user", "content": "x" * (loaded.block_size - around - 10)}
    assert loaded.fit([question], 500).max_new_tokens == 10
    with pytest.raises(chat_model.ContextFull, match="no room for a reply"):
        loaded.fit([SYSTEM, {"role": "user", "content": "x" * loaded.block_size}], 10)


def test_ctrl_c_during_a_reply_stops_it_and_keeps_what_was_said(loaded, capsys):
    tokens = loaded.tokenizer.encode("Hello 长江 🙂")
    model = scripted(loaded, tokens, raise_after=3)
    answer, stopped = chat.show_reply(model.reply(model.fit([{"role": "user", "content": "你好"}], 50)))
    assert stopped
    assert answer.encode() == loaded.tokenizer.decode_bytes(tokens[:3])
    assert capsys.readouterr().out == answer + "\n(stopped)\n"
    assert model.decoder.closed


def test_piped_chat_keeps_the_conversation_and_drops_the_oldest_turns_when_full(tmp_path):
    out_dir = write_chat_checkpoint(tmp_path / "out-small", block_size=64)
    questions = ["hello?", "why so?", "how come?", "and then?"]  # a token a letter: the second turn is too long
    result = subprocess.run([sys.executable, os.path.join(REPO, "chat.py"), f"--out_dir={out_dir}", "--max_new_tokens=8",
                             "--system=be brief", *SAMPLING_ARGS], input="\n".join(questions) + "\n", capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    turns = result.stdout.split("> ")
    assert turns[0] == "" and turns[-1] == "\n"  # a prompt per question, and one more that read the end of input
    assert len(turns[1:-1]) == len(questions)
    for number, (question, turn) in enumerate(zip(questions, turns[1:-1])):
        lines = turn.splitlines()
        assert lines[0] == question  # piped input is echoed
        if number > 0:
            assert lines[1] == "(the conversation is longer than the model's 64-token context: left out its 2 oldest messages)"
        said = lines[1 + (number > 0):]  # the tiny model draws no newline (chat_checkpoint.py): a reply is one line
        assert len(said) == 1 and said[0].strip()


@pytest.mark.parametrize("encoding", ["utf-8:strict", "utf-8:surrogateescape"])  # a UTF-8 locale's stdin, and C.UTF-8's
def test_a_piped_line_that_is_not_utf8_is_left_out_and_the_chat_goes_on(chat_dir, encoding):
    gbk = "你好".encode("gbk")
    result = subprocess.run([sys.executable, os.path.join(REPO, "chat.py"), f"--out_dir={chat_dir}", "--max_new_tokens=4",
                             *SAMPLING_ARGS], input=b"hello?\n" + gbk + b"\nand then?\n", capture_output=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING=encoding))
    assert result.returncode == 0 and b"Traceback" not in result.stderr, result.stderr
    out = result.stdout.decode("utf-8")
    assert out.count("(that line is not UTF-8 text; it is left out)") == 1 and "and then?" in out


def test_ctrl_c_at_the_prompt_ends_the_chat_without_a_traceback(chat_dir):
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "chat.py"), f"--out_dir={chat_dir}", *SAMPLING_ARGS],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    try:
        seen = b""
        while not seen.endswith(b"> "):  # the prompt: chat.py now waits in input()
            byte = process.stdout.read(1)
            assert byte, process.stderr.read()
            seen += byte
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert err == b"" and out == b"\n"


def test_a_base_model_is_one_line(tmp_path):
    base = write_chat_checkpoint(tmp_path / "out-base", chat=False)
    result = run_script("chat.py", f"--out_dir={base}", "--device=cpu")
    assert_user_error(result, "holds a base model, not a chat model", "fine-tune it first")


def test_bad_flags_are_one_line(chat_dir):
    assert_user_error(run_script("chat.py", f"--out_dir={chat_dir}", "--max_new_tokens=0"), "--max_new_tokens")
    # each reply draws with seed + its number: a seed near 2**64 failed at the second reply
    assert_user_error(run_script("chat.py", f"--out_dir={chat_dir}", "--seed=18446744073709551615"), "--seed must be between")


def test_a_system_prompt_that_fills_the_context_is_one_line(chat_dir):
    result = run_script("chat.py", f"--out_dir={chat_dir}", "--device=cpu", "--system=" + "长" * 5000)
    assert_user_error(result, "--system leaves no room in the model's", "shorten it")


def test_a_closed_stdin_is_one_line(chat_dir):
    result = subprocess.run([sys.executable, os.path.join(REPO, "chat.py"), f"--out_dir={chat_dir}", "--device=cpu"],
                            capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.close(0))
    assert_user_error(result, "reads the conversation from standard input, which is closed")


class FakeReply:
    """A Reply's interface: its pieces, finish_reason, completion_tokens."""

    def __init__(self, pieces):
        self.pieces, self.finish_reason, self.completion_tokens, self.closed = pieces, "length", 0, False

    def __iter__(self):
        try:
            for piece in self.pieces:
                self.completion_tokens += 1
                yield piece
        finally:
            self.closed = True


@pytest.mark.parametrize("pieces, stops, text, stopped", [
    (["滚滚", "长江", "东逝水"], ["江东"], "滚滚长", True),  # across two pieces
    (["ab", "c", "abd", "e"], ["abde", "cab"], "ab", True),  # the first to occur wins, wherever it starts
    (["ab", "c", "ab", "d"], ["abd!", "cabz"], "abcabd", False),  # held back as a possible start, then let go
    (["x", "<|", "end"], ["<|end|>"], "x<|end", False),  # held to the end of the reply, then given out
    (["stop", "here"], ["stop"], "", True),
    (["a", "b"], [], "ab", False),
])
def test_until_stop_cuts_before_the_first_stop_string_and_loses_no_other_text(pieces, stops, text, stopped):
    reply = FakeReply(pieces)
    cut = chat_model.UntilStop(reply, stops)
    given = list(cut)
    assert "".join(given) == text and all(given)  # no empty pieces
    assert cut.finish_reason == ("stop" if stopped else "length") and reply.closed  # the drawing ends with it
