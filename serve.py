"""Serve a fine-tuned chat model the way tools expect: OpenAI's chat completions API and a web page,
answering one request at a time (the others wait their turn).

    python serve.py --out_dir=out-chat                # then open http://127.0.0.1:8000
    python serve.py --out_dir=out-chat --port=8001 --host=0.0.0.0   # reachable from other machines

- POST /v1/chat/completions: {"model", "messages", "temperature", "top_k", "max_tokens" (or
  "max_completion_tokens"), "seed", "stop" (up to 4 strings), "stream"}; with "stream": true the reply
  comes as server-sent events (`data: {chunk}` ... `data: [DONE]`) in OpenAI's chunk format. "top_p"
  is accepted and ignored (the decoder draws with temperature and top-k only). So the `openai` Python
  client, Open-WebUI and the like work with base_url=http://127.0.0.1:8000/v1 and any api_key.
- GET /v1/models: the one model, named after the run's folder.
- GET /: a chat page (opengpt/chat_page.html), one file that streams from the API above.
A bad request gets OpenAI's JSON error ({"error": {"message", "type", "param", "code"}}) with a 400,
404 or 405 status; the server goes on. One request at a time: one model on one CPU or GPU would only
split its speed between two. A conversation longer than the model's context loses its oldest
messages (never the system prompt), as in chat.py. Bound to 127.0.0.1 by default: no one else can
reach it, and it answers only requests addressed to 127.0.0.1 or localhost (a web page that points its
own name at 127.0.0.1, DNS rebinding, is refused); there is no API key check, so think before
--host=0.0.0.0. A client that hangs up ends its reply's drawing, streamed or not.

FastAPI on uvicorn: both well kept and widely used, FastAPI's request models give the 400s with a
message naming the field, and they are what OpenAI-compatible servers people point Open-WebUI and
the openai client at (vLLM's, llama-cpp-python's, minimind's) are built on.
"""
import errno
import os
import socket
import sys
import time
import uuid
from typing import Annotated, Literal, Optional, Union

from opengpt import chat_model
from opengpt.cli import UserError, run
from configurator import parse_args

DEFAULTS = dict(
    out_dir="out",  # a chat model's run folder: train.py --init_from=... on prepare_chat.py's data
    host="127.0.0.1",  # 127.0.0.1: this machine only; 0.0.0.0: every network it is on (no API key check!)
    port=8000,
    max_new_tokens=256,  # a reply's limit when the request sets no max_tokens
    temperature=0.8,  # when the request sets none; 0 = greedy
    top_k=200,  # when the request sets none; 0 = no top-k filtering
    device="auto",
    dtype="auto",
    compile=False,  # compile the one-token step at the first reply (on a CPU once per machine, ~15 s), then faster tokens
)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "opengpt", "chat_page.html")


def bind(host, port):
    """A listening socket on host:port, or one line saying why not. Bound here, before uvicorn, so a
    port in use is one line, and connections made while the model loads wait instead of failing."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port={port} is not a port number (0 to 65535)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"--host={host} is not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port still closing (TIME_WAIT) is free; one in use is not
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another serve.py?); stop that, or choose another "
                            f"port with --port={port + 1}") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --host or --port") from None
    sock.listen(128)
    return sock


def create_app(model, model_id, cfg):
    """The FastAPI app answering for model (a chat_model.ChatModel) under the name model_id; cfg gives
    the defaults of what a request leaves out (max_new_tokens, temperature, top_k)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException

    class TextPart(BaseModel):
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore")  # name, tool_calls, ...: accepted, not used
        # OpenAI's newer "developer" is its system prompt
        role: Literal["system", "developer", "user", "assistant"]
        content: Union[str, list[TextPart]]

    NonEmpty = Annotated[str, Field(min_length=1)]

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")  # presence_penalty, user, ...: accepted, not used
        model: str
        messages: list[Message] = Field(min_length=1)
        temperature: Optional[float] = Field(None, ge=0, le=2)
        top_p: Optional[float] = Field(None, gt=0, le=1)  # accepted, not used: the decoder has no nucleus sampling
        top_k: Optional[int] = Field(None, ge=0)
        max_tokens: Optional[int] = Field(None, ge=1)
        max_completion_tokens: Optional[int] = Field(None, ge=1)  # OpenAI's newer name for max_tokens
        seed: Optional[int] = Field(None, ge=-2**63, le=2**64 - 1)  # what torch.Generator.manual_seed takes
        stop: Union[NonEmpty, Annotated[list[NonEmpty], Field(max_length=4)], None] = None
        n: Optional[int] = Field(None, ge=1, le=1)  # one reply per request (the openai client sends None)
        stream: Optional[bool] = None
        stream_options: Optional[dict] = None

    app = FastAPI(title="Open GPT Training chat", docs_url=None, redoc_url=None, openapi_url=None)
    one_at_a_time = anyio.Lock()  # one model: requests take turns (module docstring)
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    created = int(time.time())

    def error(status, message, param=None, code=None):
        body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc):
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem["loc"] if part != "body")
        if problem["type"] == "json_invalid":
            return error(400, f"the request body is not valid JSON ({problem.get('ctx', {}).get('error', problem['msg'])})")
        return error(400, f"{where or 'the request body'}: {problem['msg']}", param=where or None)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        if exc.status_code == 404:
            return error(404, f"no {request.url.path} here; the API is at /v1/chat/completions and /v1/models", code="not_found")
        return error(exc.status_code, str(exc.detail))

    class ThisMachineOnly:
        """Refuses a request whose Host header names another machine, as a web page's does that points its own
        name at 127.0.0.1 to read a local server's answers (DNS rebinding). Plain ASGI: FastAPI's
        @app.middleware would run a streamed reply in another task, which then cannot release the turn."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http":
                host = next((value.decode("latin-1") for key, value in scope["headers"] if key == b"host"), "")
                name = host if host.endswith("]") else host.rpartition(":")[0] or host  # without the port
                if name.strip("[]").lower() not in LOOPBACK:
                    refusal = error(400, f"the Host header {host!r} is not this machine: serve.py on {cfg['host']} "
                                         f"answers requests to 127.0.0.1 or localhost only", code="invalid_host")
                    return await refusal(scope, receive, send)
            await self.app(scope, receive, send)

    if cfg["host"] in LOOPBACK:
        app.add_middleware(ThisMachineOnly)

    @app.get("/", response_class=HTMLResponse)
    def chat_page():
        return page

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def one_model(name: str):
        return model_card() if name == model_id else unknown_model(name)

    def model_card():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "open-gpt-training"}

    def unknown_model(name):
        return error(404, f"the model {name!r} does not exist; this server has {model_id!r}", param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        if request.model != model_id:
            return unknown_model(request.model)
        messages = []
        for number, message in enumerate(request.messages):
            text = message.content if isinstance(message.content, str) else "".join(part.text for part in message.content)
            role = "system" if message.role == "developer" else message.role
            if role != "system" and not text.strip():
                return error(400, f"messages.{number}.content is empty", param=f"messages.{number}.content")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # JSON may spell a lone surrogate (\ud800), which is no text
                return error(400, f"messages.{number}.content holds a lone surrogate, not text",
                             param=f"messages.{number}.content")
            messages.append({"role": role, "content": text})
        if messages[-1]["role"] != "user":
            return error(400, f"the last message is the {messages[-1]['role']}'s; the model answers the user's", param="messages")
        if len(messages) > 1 and any(m["role"] == "system" for m in messages[1:]):
            return error(400, "a system message may only come first", param="messages")
        limit = request.max_completion_tokens or request.max_tokens or cfg["max_new_tokens"]
        try:  # off the event loop: a long conversation takes a while to encode
            fitted = await anyio.to_thread.run_sync(model.fit, messages, limit)
        except chat_model.ContextFull as e:
            return error(400, str(e), param="messages", code="context_length_exceeded")
        sampling = dict(temperature=cfg["temperature"] if request.temperature is None else request.temperature,
                        top_k=cfg["top_k"] if request.top_k is None else request.top_k, seed=request.seed)
        stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
        completion = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_id)
        if request.stream:
            usage = bool((request.stream_options or {}).get("include_usage"))
            return StreamingResponse(events(fitted, sampling, stops, completion, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async with one_at_a_time:
            reply = chat_model.UntilStop(model.reply(fitted, **sampling), stops)
            pieces, text = iter(reply), []
            try:  # a token at a time, off the event loop (/v1/models still answers), until the client has gone
                while (piece := await anyio.to_thread.run_sync(next, pieces, None)) is not None:
                    text.append(piece)
                    if await http.is_disconnected():
                        break
            finally:
                pieces.close()
        message = {"role": "assistant", "content": "".join(text)}
        return completion | {"object": "chat.completion", "usage": usage_of(fitted, reply),
                             "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}]}

    async def events(fitted, sampling, stops, completion, with_usage):
        """The reply as OpenAI's chunks, a token's text at a time. The turn is held until the reply is
        done or the client has gone (the generator is then closed, which ends the drawing)."""
        def chunk(delta, finish_reason=None, **more):
            body = completion | {"object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]} | more
            return f"data: {json_text(body)}\n\n"

        async with one_at_a_time:
            reply = chat_model.UntilStop(model.reply(fitted, **sampling), stops)
            pieces = iter(reply)
            yield chunk({"role": "assistant", "content": ""})
            try:
                while (piece := await anyio.to_thread.run_sync(next, pieces, None)) is not None:
                    yield chunk({"content": piece})
            finally:
                pieces.close()
            yield chunk({}, reply.finish_reason)
            if with_usage:
                usage = {"object": "chat.completion.chunk", "choices": [], "usage": usage_of(fitted, reply)}
                yield f"data: {json_text(completion | usage)}\n\n"
            yield "data: [DONE]\n\n"

    return app


def usage_of(fitted, reply):
    prompt_tokens = len(fitted.prompt_ids)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": prompt_tokens + reply.completion_tokens}


def json_text(value):
    import json

    return json.dumps(value, ensure_ascii=False)


def main():
    cfg = parse_args(DEFAULTS, sys.argv[1:])
    chat_model.check_sampling_options(cfg)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("serve.py needs FastAPI and uvicorn: pip install -r requirements.txt") from None
    sock = bind(cfg["host"], cfg["port"])
    model = chat_model.load(cfg["out_dir"], cfg["device"], cfg["dtype"], compiled=cfg["compile"])
    model_id = os.path.basename(os.path.abspath(cfg["out_dir"]))
    app = create_app(model, model_id, cfg)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    print(f"serving {model_id} on {url} (chat page at /, OpenAI API at {url}/v1; one request at a time); Ctrl-C stops",
          flush=True)
    if cfg["host"] not in LOOPBACK:
        print(f"note: --host={cfg['host']} lets other machines reach this server, and it checks no API key", file=sys.stderr)
    # Ctrl-C: the reply being drawn gets 3 s to finish, the queued ones are dropped (uvicorn would wait for them all)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)).run(sockets=[sock])


if __name__ == "__main__":
    run(main)
