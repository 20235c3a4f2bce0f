"""serve.py: the real `openai` client gets answers (streamed and not) on 127.0.0.1, a bad request gets
OpenAI's JSON error with a 400-class status and the server goes on, requests take turns, a port in
use and a base model are one line."""
import http.client
import json
import threading

import pytest

from chat_checkpoint import Server, write_chat_checkpoint
from conftest import assert_user_error, run_script
from opengpt import chat_model, hardware
from opengpt.cli import UserError

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

QUESTION = [{"role": "system", "content": "你是一个乐于助人的助手。"},
            {"role": "user", "content": "滚滚长江东逝水？"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out_dir = write_chat_checkpoint(tmp_path_factory.mktemp("serve") / "out-chat")
    server = Server(out_dir)
    yield server
    assert "Traceback" not in server.stop()  # no request crashed it


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


def request(server, method, path, body=None, raw=None):
    """(status, parsed JSON body) of one plain HTTP request."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    status, text = response.status, response.read().decode()
    connection.close()
    return status, json.loads(text)


def test_the_openai_client_gets_an_answer(server, client):
    completion = client.chat.completions.create(model=server.model_id, messages=QUESTION, max_tokens=6, seed=1)
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason == "length"  # the tiny model never ends its turn (chat_checkpoint.py)
    assert completion.usage.completion_tokens == 6 and completion.usage.prompt_tokens > 0
    assert completion.model == server.model_id and completion.id.startswith("chatcmpl-")


def test_a_streamed_answer_is_the_same_answer_in_pieces(server, client):
    ask = dict(model=server.model_id, messages=QUESTION, max_tokens=8, seed=7, temperature=1.0)
    whole = client.chat.completions.create(**ask).choices[0].message.content
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage.completion_tokens == 8


def test_models_lists_the_one_model(server, client):
    assert [model.id for model in client.models.list()] == [server.model_id]
    assert client.models.retrieve(server.model_id).id == server.model_id


def test_the_page_is_served_at_the_root(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("GET", "/")
    response = connection.getresponse()
    page = response.read().decode()
    assert response.status == 200 and response.getheader("content-type").startswith("text/html")
    assert "/v1/chat/completions" in page and "http" not in page.split("<script>")[1]  # nothing from elsewhere


BAD_REQUESTS = [
    # (body or raw bytes, status, words in the message, param)
    (b"{not json", 400, "not valid JSON", None),
    ({"model": "M"}, 400, "messages: Field required", "messages"),
    ({"model": "M", "messages": []}, 400, "messages", "messages"),
    ({"model": "M", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role", "messages.0.role"),
    ({"model": "M", "messages": [{"role": "user", "content": 3}]}, 400, "content", None),
    ({"model": "M", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "content", None),
    ({"model": "M", "messages": [{"role": "user", "content": "  "}]}, 400, "empty", "messages.0.content"),
    ({"model": "M", "messages": [{"role": "user", "content": "a\ud800"}]}, 400, "lone surrogate", "messages.0.content"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400,
     "the last message is the assistant's", "messages"),
    ({"model": "M", "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"},
                                 {"role": "user", "content": "hi"}]}, 400, "only come first", "messages"),
    ({"model": "M", "messages": QUESTION, "temperature": -1}, 400, "temperature", "temperature"),
    ({"model": "M", "messages": QUESTION, "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ({"model": "M", "messages": QUESTION, "n": 2}, 400, "n", "n"),
    ({"model": "M", "messages": QUESTION, "stream": "sometimes"}, 400, "stream", "stream"),
    ({"model": "M", "messages": [{"role": "user", "content": "x" * 200}]}, 400, "no room for a reply", "messages"),
    ({"model": "M", "messages": QUESTION, "seed": 2**64}, 400, "seed", "seed"),  # past what torch takes: was a 500
    ({"model": "M", "messages": QUESTION, "seed": -2**63 - 1}, 400, "seed", "seed"),
    ({"model": "M", "messages": QUESTION, "stop": ""}, 400, "stop", None),
    ({"model": "M", "messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"model": "gpt-4o", "messages": QUESTION}, 404, "'gpt-4o' does not exist", "model"),
]


@pytest.mark.parametrize("body, status, words, param", BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_a_bad_request_is_an_openai_error_and_the_server_goes_on(server, body, status, words, param):
    if isinstance(body, dict) and body.get("model") == "M":
        body = body | {"model": server.model_id}
    got, answer = request(server, "POST", "/v1/chat/completions", **({"raw": body} if isinstance(body, bytes) else {"body": body}))
    assert got == status, answer
    error = answer["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert set(error) == {"message", "type", "param", "code"}


def test_a_request_addressed_to_another_machine_is_refused(server):
    """DNS rebinding: a web page whose name now points at 127.0.0.1 sends its own name as the Host."""
    for host, status in ((f"attacker.example:{server.port}", 400), ("evil.com", 400), ("127.0.0.1.evil.com", 400),
                         (f"localhost:{server.port}", 200), (f"127.0.0.1:{server.port}", 200), ("localhost", 200)):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("GET", "/v1/models", headers={"Host": host})
        response = connection.getresponse()
        answer = json.loads(response.read().decode())
        connection.close()
        assert response.status == status, (host, answer)
        if status == 400:
            assert answer["error"]["code"] == "invalid_host" and repr(host) in answer["error"]["message"]


def test_what_the_openai_client_may_send_as_none_is_the_default(server):
    status, answer = request(server, "POST", "/v1/chat/completions",
                             body={"model": server.model_id, "messages": QUESTION, "max_tokens": 3, "n": None, "stream": None})
    assert status == 200 and answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == 3


def test_a_stop_string_ends_the_reply_before_it_streamed_or_not(server, client):
    ask = dict(model=server.model_id, messages=QUESTION, max_tokens=12, seed=5, temperature=1.0)
    whole = client.chat.completions.create(**ask).choices[0].message.content
    stop = whole[3:5]
    cut = whole[:whole.index(stop)]
    for stops in (stop, [stop, "never in it"]):
        answer = client.chat.completions.create(**ask, stop=stops).choices[0]
        assert answer.message.content == cut and answer.finish_reason == "stop"
        chunks = list(client.chat.completions.create(**ask, stop=stops, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == cut
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    unmatched = client.chat.completions.create(**ask, stop="never in it").choices[0]
    assert unmatched.message.content == whole and unmatched.finish_reason == "length"


def test_unknown_paths_and_methods_are_openai_errors(server, client):
    assert request(server, "GET", "/v1/nothing")[0] == 404
    status, answer = request(server, "GET", "/v1/chat/completions")
    assert status == 405 and answer["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_requests_take_turns_and_a_client_that_leaves_frees_the_model(server, client):
    # one client reads a streamed reply's first event and hangs up
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                       body=json.dumps({"model": server.model_id, "messages": QUESTION, "stream": True, "max_tokens": 60}))
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.close()
    # then three at once: each gets its whole answer, one after another
    answers = []

    def ask(seed):
        answers.append(client.chat.completions.create(model=server.model_id, messages=QUESTION, max_tokens=5, seed=seed))

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [a.usage.completion_tokens for a in answers] == [5, 5, 5]


def test_a_compiled_server_streams_what_the_eager_decoder_draws(server):
    """--compile=True: the one-token step is compiled at the first request, in a worker thread, and each
    token may be drawn in another; the text is the eager decoder's for the same seed."""
    try:
        hardware.check_compile_works("cpu")
    except UserError as e:  # no working torch.compile here (e.g. no C++ compiler): serve.py refuses in one line
        pytest.skip(str(e))
    compiled = Server(server.out_dir, "--compile=True", "--dtype=float32")  # bfloat16 would round the two differently
    try:
        ask = dict(model=compiled.model_id, messages=QUESTION, max_tokens=8, seed=3, temperature=1.0)
        client = openai.OpenAI(base_url=f"{compiled.url}/v1", api_key="none", max_retries=0, timeout=300)
        chunks = client.chat.completions.create(**ask, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finally:
        errors = compiled.stop()
    assert "Traceback" not in errors
    eager = chat_model.load(str(server.out_dir), device="cpu", dtype="float32")
    expected = "".join(eager.reply(eager.fit(QUESTION, 8), temperature=1.0, top_k=5, seed=3))
    assert streamed == expected and streamed


def test_a_port_in_use_is_one_line(server):
    result = run_script("serve.py", "--out_dir=nowhere", f"--port={server.port}")
    assert_user_error(result, f"port {server.port} on 127.0.0.1 is in use", f"--port={server.port + 1}")


def test_a_base_model_is_one_line(tmp_path):
    base = write_chat_checkpoint(tmp_path / "out-base", chat=False)
    result = run_script("serve.py", f"--out_dir={base}", "--port=0", "--device=cpu")
    assert_user_error(result, "holds a base model, not a chat model")
