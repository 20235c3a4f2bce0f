"""Talk to a fine-tuned chat model in the terminal.

    python chat.py --out_dir=out-chat
    python chat.py --out_dir=out-chat --system="你是一个乐于助人的助手。" --temperature=0.7
    echo "这条评论是正面还是负面？质量很好" | python chat.py --out_dir=out-chat   # one question, piped

The conversation is kept and sent whole each turn (ChatML, opengpt/chat_format.py); the reply is
printed as it is drawn and ends at <|im_end|>. A conversation longer than the model's context loses
its oldest messages (never the system prompt), with a line saying so. Ctrl-C during a reply stops
that reply; Ctrl-C or Ctrl-D (end of input) at the prompt ends the chat.
"""
import sys

from opengpt import chat_model
from opengpt.cli import UserError, run
from configurator import parse_args

DEFAULTS = dict(
    out_dir="out",  # a chat model's run folder: train.py --init_from=... on prepare_chat.py's data
    system="",  # the system prompt, e.g. --system="你是一个乐于助人的助手。"; empty: none
    max_new_tokens=256,  # the longest reply, in tokens (fewer where the model's context ends first)
    temperature=0.8,  # 0 = greedy
    top_k=200,  # 0 = no top-k filtering
    seed=1337,  # each reply draws with seed + its number, so a chat replays the same for the same input
    device="auto",
    dtype="auto",
    compile=False,  # compile the one-token step at the first reply (on a CPU once per machine, ~15 s), then faster tokens
)
PROMPT = "> "


def read_message():
    """The user's next line, or None at the end of the chat (Ctrl-D, Ctrl-C, or the end of piped input)."""
    try:
        text = input(PROMPT)
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    if not sys.stdin.isatty():  # piped input is not echoed: print it, so the output reads as the conversation
        print(text.encode("utf-8", "replace").decode("utf-8"), flush=True)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are no UTF-8 come in as lone surrogates, which no tokenizer takes
        say("that line is not UTF-8 text; it is left out")
        return ""
    return text


def say(text):
    """A line of our own (not the model's), in parentheses so a reader tells them apart."""
    print(f"({text})", flush=True)


def show_reply(reply):
    """Print the reply as it comes; (its text, or what came of it before a Ctrl-C, whether one stopped it)."""
    pieces = []
    try:
        for piece in reply:
            print(piece, end="", flush=True)
            pieces.append(piece)
        print(flush=True)
        return "".join(pieces), False
    except KeyboardInterrupt:
        print(flush=True)
        say("stopped")
        return "".join(pieces), True


def chat(model, cfg):
    messages = [{"role": "system", "content": cfg["system"]}] if cfg["system"].strip() else []
    number = 0
    while (text := read_message()) is not None:
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        try:
            fitted = model.fit(messages, cfg["max_new_tokens"])
        except chat_model.ContextFull as e:
            say(str(e))
            messages.pop()
            continue
        if fitted.dropped:
            system = messages[:1] if messages[0]["role"] == "system" else []
            messages = system + messages[len(system) + fitted.dropped:]
            say(f"the conversation is longer than the model's {model.block_size}-token context: "
                f"left out its {fitted.dropped} oldest messages")
        answer, stopped = show_reply(model.reply(fitted, cfg["temperature"], cfg["top_k"], cfg["seed"] + number))
        number += 1
        if answer.strip():
            messages.append({"role": "assistant", "content": answer})
        else:  # an empty reply is no turn: the template has no empty message, so the question goes too
            if not stopped:
                say("no reply; ask again")
            messages.pop()


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    chat_model.check_sampling_options(cfg)
    if sys.stdin is None:
        raise UserError("chat.py reads the conversation from standard input, which is closed; run it in a terminal "
                        "or pipe lines into it")
    model = chat_model.load(cfg["out_dir"], cfg["device"], cfg["dtype"], compiled=cfg["compile"])
    if cfg["system"].strip():  # else every message would be refused for the room the system prompt takes
        try:
            model.fit([{"role": "system", "content": cfg["system"]}, {"role": "user", "content": "好"}], 1)
        except chat_model.ContextFull:
            raise UserError(f"--system leaves no room in the model's {model.block_size}-token context for a message "
                            f"and its reply; shorten it") from None
    # under a UTF-8 locale a byte that is no UTF-8 (a piped GBK file) would end the chat in a traceback;
    # escaped, it comes in as a lone surrogate, and read_message leaves its line out
    if hasattr(sys.stdin, "reconfigure"):  # not on a stand-in stream without it
        sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history in input(); absent on Windows)
        except ImportError:
            pass
        say(f"chatting with {cfg['out_dir']}; Ctrl-C stops a reply, Ctrl-D or Ctrl-C here ends the chat")
    chat(model, cfg)


if __name__ == "__main__":
    run(main)
