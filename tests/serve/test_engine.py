"""The scheduler: requests decoded together get the tokens of decoding each alone; stops, cancellation, failures."""

from __future__ import annotations

import queue
import time

import pytest
import torch

from lit_llm.model.sampling import generate
from lit_llm.serve.engine import Engine, EngineClosed, Event, GenerationRequest, QueueFull, TextStream
from lit_llm.weights.readers import load_model_for_inference


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    model, tokenizer, _ = load_model_for_inference(str(tiny_checkpoint))
    return model, tokenizer


@pytest.fixture
def engine(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, slots=3, max_queue=8).start()
    yield engine
    engine.close()


class Collector:
    """A request's events, waited for from the test thread."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue()

    def __call__(self, event: Event) -> None:
        self.events.put(event)

    def wait(self, timeout: float = 60.0) -> tuple[str, Event]:
        parts = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event.kind == "text":
                parts.append(event.text)
            else:
                return "".join(parts), event


def alone(model, tokenizer, ids: list[int], n: int) -> list[int]:
    """Greedy tokens of the model's own loop, cut at end-of-text."""
    out = generate(model, torch.tensor([ids]), n, eos_id=tokenizer.eos_id)[0, len(ids):].tolist()
    return out[: out.index(tokenizer.eos_id)] if tokenizer.eos_id in out else out


def test_requests_decoded_together_get_the_tokens_of_decoding_alone(loaded, engine):
    model, tokenizer = loaded
    prompts = ["The import statement", "def", "Classes provide a means of bundling data and functionality",
               "x", "A module is a file containing Python definitions", "for i in range"]
    requests = []
    for text in prompts:  # 6 requests for 3 slots: the last ones join as the first ones finish
        request = GenerationRequest(tokenizer.encode(text), max_tokens=30, emit=Collector())
        engine.submit(request)
        requests.append(request)
    for text, request in zip(prompts, requests):
        got, done = request.emit.wait()
        expected = alone(model, tokenizer, tokenizer.encode(text), 30)
        assert done.kind == "done"
        assert got == tokenizer.decode(expected)
        assert done.completion_tokens == len(expected)
        assert done.finish_reason == ("length" if len(expected) == 30 else "stop")
        assert done.prompt_tokens == len(tokenizer.encode(text))


def test_sampling_is_reproducible_with_a_seed_whatever_else_is_decoded(loaded, engine):
    model, tokenizer = loaded
    ids = tokenizer.encode("The import statement")

    def sample(seed: int, neighbours: int) -> str:
        others = [GenerationRequest(ids[:2], max_tokens=20, emit=Collector(), temperature=1.0)
                  for _ in range(neighbours)]
        request = GenerationRequest(ids, max_tokens=20, emit=Collector(), temperature=1.0, top_p=0.9, seed=seed)
        for r in [*others, request]:
            engine.submit(r)
        text, _ = request.emit.wait()
        for r in others:
            r.emit.wait()
        return text

    assert sample(5, 0) == sample(5, 2)
    assert sample(5, 0) != sample(6, 0)


def test_the_context_ends_a_completion(loaded, engine):
    model, tokenizer = loaded
    ctx = model.config.context_length
    request = GenerationRequest([5] * (ctx - 3), max_tokens=50, emit=Collector())
    engine.submit(request)
    text, done = request.emit.wait()
    # ctx - 3 prompt tokens leave 3 positions to feed new tokens into: the 4th new token is the last one.
    expected = alone(model, tokenizer, [5] * (ctx - 3), 4)
    assert len(expected) == 4, "the fixture's model should not end this text early"
    assert (text, done.finish_reason, done.completion_tokens) == (tokenizer.decode(expected), "length", 4)


def test_a_cancelled_request_leaves_its_slot(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, slots=1, max_queue=0).start()
    slow = engine.decoder.decode

    def slowed(*args, **kwargs):
        time.sleep(0.02)
        return slow(*args, **kwargs)

    engine.decoder.decode = slowed
    try:
        first = GenerationRequest([5, 6, 7], max_tokens=100, emit=Collector())
        engine.submit(first)
        with pytest.raises(QueueFull, match="--max-queue 0"):
            engine.submit(GenerationRequest([5], max_tokens=5, emit=Collector()))
        time.sleep(0.1)
        first.cancel()
        deadline = time.monotonic() + 2
        while engine.stats()["active"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats() == {"active": 0, "queued": 0, "slots": 1, "max_queue": 0}
        second = GenerationRequest([5], max_tokens=5, emit=Collector())
        engine.submit(second)
        assert second.emit.wait()[1].kind == "done"
    finally:
        engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(GenerationRequest([5], max_tokens=5, emit=Collector()))


def test_a_failing_request_fails_alone(loaded, engine):
    model, tokenizer = loaded
    prefill = engine.decoder.prefill

    def faulty(row, ids):
        if int(ids[0, 0]) == 42:
            raise RuntimeError("injected fault")
        return prefill(row, ids)

    engine.decoder.prefill = faulty
    bad = GenerationRequest([42, 5], max_tokens=5, emit=Collector())
    good = GenerationRequest([7, 5], max_tokens=5, emit=Collector())
    engine.submit(bad)
    engine.submit(good)
    text, event = bad.emit.wait()
    assert event.kind == "error" and "injected fault" in event.text
    assert good.emit.wait()[1].kind == "done"
    # A whole decode step failing fails the requests in it, and the next request is served.
    decode = engine.decoder.decode
    engine.decoder.decode = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("step fault"))
    victim = GenerationRequest([7, 5], max_tokens=5, emit=Collector())
    engine.submit(victim)
    assert victim.emit.wait()[1].text.endswith("step fault")
    engine.decoder.decode = decode
    after = GenerationRequest([7, 5], max_tokens=5, emit=Collector())
    engine.submit(after)
    assert after.emit.wait()[1].kind == "done"


class CharTokenizer:
    """Each token one character (token 0: end-of-text); byte pairs model characters split over two tokens."""

    eos_id = 0

    def decode(self, ids):
        out = []
        for i in ids:
            out.append("\ufffd" if i == 1 else ("é" if i == 2 else chr(i)))
        text = "".join(out)
        return text.replace("\ufffdé", "é")  # token 1 then 2: one character in two tokens


def feed(stream: TextStream, text: str) -> tuple[list[str], bool]:
    released = []
    for ch in text:
        out, stopped = stream.add(ord(ch))
        released.append(out)
        if stopped:
            return released, True
    return released, False


def test_text_stream_cuts_at_a_stop_string_and_holds_back_its_start():
    stream = TextStream(CharTokenizer(), stop=["STOP", "xy"])
    released, stopped = feed(stream, "abcSTxSTOPdef")
    assert stopped
    assert "".join(released) == "abcSTx"
    assert released[3:5] == ["", ""]  # "S", "ST" could start "STOP": held back until "x" shows they do not


def test_text_stream_without_stop_releases_everything_and_flushes_held_text():
    stream = TextStream(CharTokenizer(), stop=["abc"])
    released, stopped = feed(stream, "xxab")
    assert not stopped and "".join(released) == "xx"
    assert stream.finish() == "ab"


def test_text_stream_waits_for_a_split_character():
    stream = TextStream(CharTokenizer())
    assert stream.add(1) == ("", False)  # half a character
    assert stream.add(2)[0] == "é"


def test_engine_thread_survives_a_failing_emit(loaded, engine):
    def broken(event):
        raise RuntimeError("client gone")

    engine.submit(GenerationRequest([5, 6], max_tokens=3, emit=broken))
    ok = GenerationRequest([5, 6], max_tokens=3, emit=Collector())
    engine.submit(ok)
    assert ok.emit.wait()[1].kind == "done"
    assert engine._thread.is_alive()
