"""The OpenAI-compatible API, through the ``openai`` client, against ``lit-llm serve`` started on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import time

import pytest

pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install -e '.[dev]'")
pytest.importorskip("uvicorn", reason="the server's tests need the serve extra: pip install -e '.[dev]'")

openai = pytest.importorskip("openai", reason="the API tests use the openai client: pip install -e '.[dev]'")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_checkpoint(client):
    (model,) = client.models.list().data
    assert model.id == "tiny-gpt" and model.owned_by == "lit_llm"
    assert client.models.retrieve("tiny-gpt").id == "tiny-gpt"


def test_completion_is_greedy_and_counts_tokens(client):
    a = client.completions.create(model="tiny-gpt", prompt="The import statement", max_tokens=20, temperature=0)
    b = client.completions.create(model="tiny-gpt", prompt="The import statement", max_tokens=20, temperature=0)
    assert a.choices[0].text == b.choices[0].text != ""
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 20 and a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + 20
    assert a.object == "text_completion" and a.id.startswith("cmpl-")


def test_streaming_gives_the_same_text_in_pieces(client):
    whole = client.completions.create(model="tiny-gpt", prompt="Classes", max_tokens=25, temperature=0)
    stream = client.completions.create(model="tiny-gpt", prompt="Classes", max_tokens=25, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].text for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 25
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streams_the_answer_of_the_non_streaming_call(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a module."}]
    whole = client.chat.completions.create(model="tiny-gpt", messages=messages, max_tokens=15, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.object == "chat.completion"
    stream = client.chat.completions.create(model="tiny-gpt", messages=messages, max_tokens=15, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content != ""
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_sequences_end_the_text_before_them(client):
    free = client.completions.create(model="tiny-gpt", prompt="def", max_tokens=40, temperature=0).choices[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 2]
    assert stop.strip(), "the fixture's model should write visible text"
    expected = free[: free.index(stop)]
    for stream in (False, True):
        result = client.completions.create(model="tiny-gpt", prompt="def", max_tokens=40, temperature=0,
                                           stop=[stop, "\x00never"], stream=stream)
        if stream:
            chunks = list(result)
            assert "".join(c.choices[0].text for c in chunks) == expected
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert result.choices[0].text == expected
            assert result.choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_reproducible(client):
    kw = dict(model="tiny-gpt", prompt="The", max_tokens=20, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=11, **kw).choices[0].text
    assert a == client.completions.create(seed=11, **kw).choices[0].text
    assert a != client.completions.create(seed=12, **kw).choices[0].text


@pytest.mark.parametrize(
    ("kwargs", "error", "status", "code"),
    [
        (dict(model="gpt-4"), "NotFoundError", 404, "model_not_found"),
        (dict(max_tokens=61), "BadRequestError", 400, "max_tokens_too_large"),
        (dict(n=2), "BadRequestError", 400, "unsupported_parameter"),
        (dict(prompt="word " * 400), "BadRequestError", 400, "context_length_exceeded"),
        (dict(temperature=-1), "UnprocessableEntityError", 422, "invalid_value"),
        (dict(stop=["a", "b", "c", "d", "e"]), "BadRequestError", 400, "invalid_value"),
    ],
)
def test_errors_have_openais_shape(client, kwargs, error, status, code):
    args = {"model": "tiny-gpt", "prompt": "The", "max_tokens": 5, **kwargs}
    with pytest.raises(getattr(openai, error)) as info:
        client.completions.create(**args)
    assert info.value.status_code == status
    body = info.value.body
    assert body["code"] == code and body["message"] and "type" in body and "param" in body


def test_http_errors_without_the_client(server, web):
    status, body = web.post(server.url + "/v1/completions", b"{not json")
    assert (status, body["error"]["code"]) == (400, "invalid_json")
    status, body = web.post(server.url + "/v1/chat/completions", {"model": "tiny-gpt", "messages": []})
    assert status == 422 and "messages" in body["error"]["message"]
    status, body = web.post(server.url + "/v1/nothing", {})
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body = web.post(server.url + "/v1/completions", b"x" * (1 << 20 + 1))
    assert (status, body["error"]["code"]) == (413, "request_too_large")
    assert web.get_json(server.url + "/health")["status"] == "ok"  # still serving


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, web):
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=30)
    body = {"model": "tiny-gpt", "prompt": "The", "max_tokens": 60, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.read(6) == b"data: "
    conn.close()  # leaves before the completion is done
    deadline = time.monotonic() + 5
    while web.get_json(server.url + "/health")["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert web.get_json(server.url + "/health")["active"] == 0


def test_the_chat_page_is_served(server):
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=10)
    for path, marker in [("/", b'id="composer"'), ("/static/app.js", b"/v1/chat/completions"),
                         ("/static/style.css", b"#messages")]:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200 and marker in response.read()


def test_an_api_key_is_required_when_set(tiny_checkpoint, start_server, web):
    with start_server(tiny_checkpoint, "--api-key", "s3cret") as server:
        denied = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            denied.models.list()
        assert info.value.body["code"] == "invalid_api_key"
        allowed = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert allowed.models.list().data[0].id == "tiny-gpt"
        assert web.get_json(server.url + "/health")["status"] == "ok"  # the page and health need no key
