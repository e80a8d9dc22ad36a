"""Fixtures of the server's tests: a tiny converted checkpoint, and servers on 127.0.0.1 (a real ``lit-llm serve``
process, or the application on a thread of the test process when a test needs to reach inside it)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 128


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide GPT (random weights, seed 0) with a 300-token BPE, as a converted weights directory."""
    from lit_llm.data.builtin import load_builtin
    from lit_llm.data.tokenizer import train_bpe
    from lit_llm.model.config import GPTConfig
    from lit_llm.model.gpt import GPTModel
    from lit_llm.weights.export import save_weights

    text = "\n\n".join(load_builtin("pydoc")["text"])[:20_000]
    tokenizer = train_bpe([text], vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=CONTEXT, emb_dim=32, n_layers=2, n_heads=2,
                       drop_rate=0.0)
    model = GPTModel(config)
    return save_weights(config, model.state_dict(), tmp_path_factory.mktemp("tiny") / "tiny-gpt", tokenizer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post(url: str, body: bytes | dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """POST and return (status, JSON body), for error statuses too. A server that answers a body it refuses (413)
    before reading it may close the connection while the body is still being sent: the answer is read all the same,
    as an HTTP client that handles early responses does."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("POST", parts.path or "/")
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                           **(headers or {})}.items():
            conn.putheader(key, value)
        conn.endheaders()
        try:
            conn.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused early; its answer is already on the way
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


class ServerProcess:
    """``python -m lit_llm.serve`` on 127.0.0.1 in a child process."""

    def __init__(self, checkpoint: Path, *args: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        # One thread: the tests' clients share the machine's cores with the server.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        env.pop("LIT_LLM_API_KEY", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lit_llm.serve", "--checkpoint", str(checkpoint), "--port", str(self.port),
             "--device", "cpu", "--log-level", "warning", *args],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if get_json(self.url + "/health", timeout=1.0)["status"] == "ok":
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"the server did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


@contextlib.contextmanager
def serve_process(checkpoint: Path, *args: str, log: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(checkpoint, *args, log=log)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(tiny_checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    """One ``lit-llm serve`` process for the tests that only talk to it: 16 slots, queue 64, max_tokens 60."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve_process(tiny_checkpoint, "--max-concurrency", "16", "--max-queue", "64", "--max-tokens", "60",
                       log=log) as s:
        yield s


class ThreadServer:
    """The server's application on a thread of this process, so a test can reach its engine."""

    def __init__(self, app, engine) -> None:
        import uvicorn

        self.engine = engine
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture
def thread_server(tiny_checkpoint):
    """Factory: ``thread_server(slots=..., max_queue=..., **limits)`` -> a started :class:`ThreadServer` (context
    manager) over the tiny checkpoint."""
    from lit_llm.serve.app import Limits, create_app
    from lit_llm.serve.engine import Engine
    from lit_llm.weights.readers import load_model_for_inference

    model, tokenizer, _ = load_model_for_inference(str(tiny_checkpoint))

    def make(slots: int = 2, max_queue: int = 4, api_key: str | None = None, **limits) -> ThreadServer:
        engine = Engine(model, tokenizer, slots=slots, max_queue=max_queue).start()
        app = create_app(engine, tokenizer, model_name="tiny", template=None, limits=Limits(**limits),
                         api_key=api_key)
        return ThreadServer(app, engine)

    return make


class Web:
    """Plain HTTP calls for the tests (as a fixture: test modules do not import each other or conftest)."""

    get_json = staticmethod(get_json)
    post = staticmethod(post)


@pytest.fixture(scope="session")
def web() -> type[Web]:
    return Web


@pytest.fixture
def start_server(tmp_path):
    """Factory: ``start_server(checkpoint, *args)`` -> context manager of a ready :class:`ServerProcess`."""
    return lambda checkpoint, *args: serve_process(checkpoint, *args, log=tmp_path / "server.log")
