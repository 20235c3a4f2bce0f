"""A fine-tuned chat model as chat.py and serve.py use it: loaded from a run's checkpoint as
sample.py loads one, the conversation fitted into its context, and its reply streamed as text.

- load(out_dir, ...) -> ChatModel; a base model (its tokenizer lacks the chat tokens) is refused
  in one line, as chat_format.is_chat_tokenizer tells.
- ChatModel.fit(messages, max_new_tokens) -> Fitted: the prompt ids of the conversation (chat_format's
  ChatML, ending with `<|im_start|>assistant\\n`), after dropping its oldest messages (never the
  system prompt) until the prompt leaves the reply min(max_new_tokens, block_size // 2) positions;
  a newest message that alone leaves no room raises ContextFull.
- ChatModel.reply(fitted, ...) -> Reply: iterating it yields the reply's text as it is drawn (decode.py's
  KV-cached Decoder), each piece whole UTF-8 characters (a Chinese character spans several byte-level
  tokens, so bytes are held back until it is complete); it stops at <|im_end|> (or <|endoftext|>,
  <|im_start|>).
- UntilStop(reply, stops): the same text cut before the first of some stop strings (serve.py's "stop").
"""
import codecs
import math
import os
from dataclasses import dataclass

from opengpt import checkpoint as ckpt
from opengpt import hardware
from opengpt.chat_format import im_end_id, im_start_id, is_chat_tokenizer, message_lengths, prompt_ids
from opengpt.cli import UserError
from opengpt.decode import Decoder, sampling_dtype


class ContextFull(ValueError):
    """The newest message, with the system prompt, leaves the reply no room in the model's context."""


@dataclass
class Fitted:
    prompt_ids: list  # what generation continues
    dropped: int  # the oldest messages left out (the system prompt never is)
    max_new_tokens: int  # the reply's limit: as asked, or fewer where the context ends first


def check_sampling_options(cfg):
    """The sampling options of chat.py, serve.py and sample.py, checked before the model loads."""
    if cfg["max_new_tokens"] <= 0:
        raise UserError(f"--max_new_tokens must be positive, got {cfg['max_new_tokens']}")
    if not 0 <= cfg["temperature"] < math.inf or cfg["top_k"] < 0:  # 1e999 parses as inf: uniform draws
        raise UserError("--temperature and --top_k must be zero or positive (and the temperature finite)")
    if "seed" in cfg and not 0 <= cfg["seed"] < 2**31:  # as train.py's; a reply's seed adds its number
        raise UserError(f"--seed must be between 0 and {2**31 - 1}, got {cfg['seed']}")


def load(out_dir, device="auto", dtype="auto", checkpoint_file=ckpt.FILENAME, compiled=False):
    """The chat model in out_dir's checkpoint, on device (auto: cuda, mps, else cpu); compiled: its replies
    take decode.py's one-token step compiled (the prompt's forward stays eager: its length varies)."""
    device = hardware.pick_device(device)  # a wrong --device is told before the slow load
    dtype = sampling_dtype(dtype, device)
    if compiled:
        hardware.check_compile_works(device)
    _, model, tokenizer = ckpt.load_trained(os.path.join(out_dir, checkpoint_file))
    if not is_chat_tokenizer(tokenizer):
        raise UserError(f"{out_dir} holds a base model, not a chat model; fine-tune it first: python prepare_chat.py "
                        f"--input=chats.jsonl --tokenizer_from={out_dir} --out=data/chat, then python train.py "
                        f"--init_from={out_dir} --data_dir=data/chat --out_dir=out-chat")
    model.to(device)
    return ChatModel(model, tokenizer, device, dtype, compiled)


class ChatModel:
    def __init__(self, model, tokenizer, device, dtype, compiled=False):
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.decoder = Decoder(model, device, dtype, compiled)
        self.block_size = model.config.block_size
        # <|endoftext|> and <|im_start|> too: a model that ends the document, or starts the next turn,
        # instead of closing its own has ended its reply all the same
        self.stop_ids = (im_end_id(tokenizer), tokenizer.eot_token, im_start_id(tokenizer))

    def fit(self, messages, max_new_tokens):
        """The conversation's prompt, its oldest turns dropped until the reply has room (module docstring).
        messages end with the user's; a system prompt, if any, comes first."""
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        # a message takes at least 4 tokens (<|im_start|>, its role and text, <|im_end|>, "\n"): no more fit,
        # so a long history costs one pass, not one per message
        turns = list(messages[len(system):][-(self.block_size // 4):])
        dropped = len(messages) - len(system) - len(turns)
        wanted = min(max_new_tokens, self.block_size // 2)
        while turns[0]["role"] != "user" and len(turns) > 1:
            turns.pop(0)
            dropped += 1
        # each message encoded once: dropping a turn subtracts its length (encoding what is left again
        # for each turn dropped took 20 s for a 6 MB request)
        lengths = message_lengths(self.tokenizer, system + turns)
        length = sum(lengths) + len(prompt_ids(self.tokenizer, []))  # and <|im_start|>assistant\n after them
        lengths = lengths[len(system):]
        while length + wanted > self.block_size and len(turns) > 1:
            turns.pop(0)
            length -= lengths.pop(0)
            dropped += 1
            while turns[0]["role"] != "user":  # the kept conversation starts with the user, as a conversation does
                turns.pop(0)
                length -= lengths.pop(0)
                dropped += 1
        ids = prompt_ids(self.tokenizer, system + turns)
        room = self.block_size - len(ids)
        if room < 1:
            raise ContextFull(f"the last message makes a prompt of {len(ids)} tokens, and the model's context "
                              f"holds {self.block_size}: there is no room for a reply; say it in fewer words")
        return Fitted(ids, dropped, min(max_new_tokens, room))

    def reply(self, fitted, temperature=0.8, top_k=None, seed=None):
        return Reply(self, fitted, temperature, top_k, seed)


class Reply:
    """The reply's text pieces, as they are drawn; afterwards finish_reason ("stop": the model ended its
    turn; "length": max_new_tokens ran out) and completion_tokens (the stop token counted) tell how it ended."""

    def __init__(self, chat_model, fitted, temperature, top_k, seed):
        self.chat_model, self.fitted = chat_model, fitted
        self.sampling = dict(temperature=temperature, top_k=top_k or None, seed=seed)
        self.finish_reason = "length"
        self.completion_tokens = 0

    def __iter__(self):
        chat_model = self.chat_model
        tokenizer = chat_model.tokenizer
        table = tokenizer.token_bytes
        # errors="ignore": bytes that are no UTF-8 at all (an undertrained model draws them) are dropped,
        # never shown as U+FFFD, as sample.py's decode_clean drops them
        text = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        tokens = chat_model.decoder.stream(self.fitted.prompt_ids, self.fitted.max_new_tokens, stop_ids=chat_model.stop_ids,
                                           n_real_vocab=tokenizer.n_vocab, **self.sampling)
        try:
            for token in tokens:
                self.completion_tokens += 1
                if token in chat_model.stop_ids:
                    self.finish_reason = "stop"
                    return
                piece = text.decode(table[token])
                if piece:
                    yield piece
        finally:
            tokens.close()  # the decoder's cache goes now, also when the caller stops early (Ctrl-C, a closed connection)


class UntilStop:
    """Iterating it yields reply's text up to the first of the stop strings, which is left out (OpenAI's "stop"):
    text that could begin one is held back until it cannot. Drawing ends there. finish_reason is then "stop",
    else the reply's; completion_tokens counts what was drawn."""

    def __init__(self, reply, stops):
        self.reply, self.stops, self.stopped = reply, [stop for stop in stops if stop], False

    @property
    def finish_reason(self):
        return "stop" if self.stopped else self.reply.finish_reason

    @property
    def completion_tokens(self):
        return self.reply.completion_tokens

    def __iter__(self):
        pieces, held = iter(self.reply), ""
        try:
            for piece in pieces:
                held += piece
                found = [at for at in (held.find(stop) for stop in self.stops) if at >= 0]
                if found:
                    self.stopped = True
                    if min(found):
                        yield held[:min(found)]
                    return
                keep = max((n for stop in self.stops for n in range(1, len(stop)) if held.endswith(stop[:n])), default=0)
                if len(held) > keep:
                    yield held[:len(held) - keep]
                    held = held[len(held) - keep:]
            if held:
                yield held
        finally:
            pieces.close()
