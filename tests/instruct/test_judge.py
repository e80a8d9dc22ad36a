"""``python -m lit_llm.judge`` against a fake Ollama / OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lit_llm.errors import DataError
from lit_llm.judge import chat_url, judge_records, main, parse_score, scoring_prompt

RECORDS = [
    {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
     "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a bullet."},
    {"instruction": "What type of cloud is typically associated with thunderstorms?", "input": "",
     "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
     "model_response": "The type of cloud associated with thunderstorms is a cumulus cloud."},
    {"instruction": "Name the author of 'Pride and Prejudice'.", "input": "",
     "output": "Jane Austen.", "model_response": "The author of 'Pride and Prejudice' is Jane Austen."},
]


class FakeJudge:
    """Records each request; replies with ``replies`` in turn, in Ollama (streamed or not) or OpenAI format."""

    def __init__(self, api: str, replies: list[str], stream: bool = False) -> None:
        self.api, self.replies, self.stream = api, list(replies), stream
        self.requests: list[tuple[str, dict, dict]] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append((self.path, body, dict(self.headers)))
                reply = judge.replies[(len(judge.requests) - 1) % len(judge.replies)]
                if judge.api == "openai":
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]})
                elif judge.stream:  # Ollama's default: one JSON object per line, a few characters each
                    chunks = [reply[i : i + 2] for i in range(0, len(reply), 2)] or [""]
                    payload = "".join(json.dumps({"message": {"content": c}, "done": False}) + "\n" for c in chunks)
                    payload += json.dumps({"message": {"content": ""}, "done": True}) + "\n"
                else:
                    payload = json.dumps({"message": {"role": "assistant", "content": reply}, "done": True})
                data = payload.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def serve() -> Iterator:
    servers = []

    def start(judge: FakeJudge) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), judge.handler())
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def responses(tmp_path: Path) -> Path:
    path = tmp_path / "test_responses.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


def test_scoring_prompt_is_the_books():
    ch07 = pytest.importorskip("llms_from_scratch.ch07")
    for entry in RECORDS:
        book = (
            f"Given the input `{ch07.format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry['model_response']}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only."
        )
        assert scoring_prompt(entry) == book


@pytest.mark.parametrize("reply, score", [("85", 85), (" 100\n", 100), ("0", 0), ("70.", 70), ("Score: 85", None),
                                          ("85/100", None), ("101", None), ("-5", None), ("", None), ("eighty", None)])
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_chat_urls():
    assert chat_url("http://localhost:11434", "ollama") == "http://localhost:11434/api/chat"
    assert chat_url("http://h:1/api/chat", "ollama") == "http://h:1/api/chat"
    assert chat_url("https://api.openai.com", "openai") == "https://api.openai.com/v1/chat/completions"
    assert chat_url("http://h:8000/v1/", "openai") == "http://h:8000/v1/chat/completions"


@pytest.mark.parametrize("stream", [False, True], ids=["single", "streamed"])
def test_ollama(serve, responses, capsys, stream):
    judge = FakeJudge("ollama", ["85", "40", "97"], stream=stream)
    url = serve(judge)
    assert main([str(responses), "--url", url, "--model", "llama3"]) == 0
    out = capsys.readouterr().out
    assert "Number of scores: 3 of 3 (0 failed)" in out and "Average score: 74.00" in out
    summary = json.loads((responses.parent / "test_responses_judge.json").read_text())
    assert summary["average_score"] == pytest.approx(74.0) and summary["n_failed"] == 0
    assert [r["score"] for r in summary["records"]] == [85, 40, 97]
    path, body, _ = judge.requests[0]
    assert path == "/api/chat" and body["model"] == "llama3"
    assert body["messages"] == [{"role": "user", "content": scoring_prompt(RECORDS[0])}]
    assert body["options"] == {"seed": 123, "temperature": 0, "num_ctx": 2048}  # the book's


def test_openai_with_key_and_a_bad_reply(serve, responses, capsys, monkeypatch, tmp_path):
    judge = FakeJudge("openai", ["90", "I would rate it 60 out of 100.", "70"])
    url = serve(judge)
    monkeypatch.setenv("JUDGE_KEY", "sk-test")
    out_file = tmp_path / "scores.json"
    rc = main([str(responses), "--api", "openai", "--url", url + "/v1", "--model", "gpt-x", "--api-key-env",
               "JUDGE_KEY", "--output", str(out_file)])
    captured = capsys.readouterr()
    assert rc == 0
    assert "Number of scores: 2 of 3 (1 failed)" in captured.out and "Average score: 80.00" in captured.out
    assert "record 1: could not read a score" in captured.err and "I would rate it 60" in captured.err
    summary = json.loads(out_file.read_text())
    assert summary["failed"] == [1] and summary["records"][1]["score"] is None
    assert summary["records"][1]["reply"] == "I would rate it 60 out of 100."
    path, body, headers = judge.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "gpt-x" and body["temperature"] == 0
    assert headers["Authorization"] == "Bearer sk-test"


def test_refused_connection_names_the_url_and_ollama(responses, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main([str(responses), "--url", f"http://127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: JudgeConnectionError: could not reach the judge at ")
    assert f"http://127.0.0.1:{port}/api/chat" in err and "ollama serve" in err


def test_not_a_chat_reply_says_check_api(serve, responses, capsys):
    url = serve(FakeJudge("openai", ["85"]))  # an OpenAI server asked in Ollama's format
    assert main([str(responses), "--url", url]) == 1
    assert "is not a ollama chat response" in capsys.readouterr().err


def test_bad_responses_files(tmp_path, capsys):
    assert main([str(tmp_path / "missing.json"), "--url", "http://127.0.0.1:9"]) == 1
    assert "missing.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([RECORDS[0], {"instruction": "x", "output": "y"}]))
    with pytest.raises(DataError, match="record 1 of the responses file has no 'model_response' field"):
        judge_records(json.loads(bad.read_text()), ask=lambda prompt: "50")
