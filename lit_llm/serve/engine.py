"""The scheduler behind ``lit-llm serve``: requests that arrive together are decoded together (continuous batching).

One thread owns the model. It keeps a :class:`~lit_llm.model.decoding.Decoder` whose slots are the requests being
decoded; between two decode steps, waiting requests take free slots (each prompt is prefilled into its slot alone)
and finished or cancelled ones leave. Every request keeps its own sampling settings and random generator, its own
stop conditions (end-of-text, stop strings, ``max_tokens``, the context) and its own text stream, so a request's
tokens do not depend on what else is being decoded (in greedy decoding they are those of decoding it alone).

The engine speaks in :class:`Event` objects handed to each request's ``emit`` callback from the engine thread; the
HTTP layer (:mod:`lit_llm.serve.app`) turns them into responses. A failure while decoding fails the requests it
touched, never the engine.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lit_llm.data.tokenizer import Tokenizer
from lit_llm.model.decoding import DecodeMode, Decoder
from lit_llm.model.gpt import GPTModel
from lit_llm.model.sampling import sample_next

log = logging.getLogger("lit_llm.serve")


class QueueFull(Exception):
    """Every slot is busy and the queue is at its limit: the client should retry later (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is shutting down or has stopped (HTTP 503)."""


@dataclass(frozen=True)
class Event:
    """What the engine reports about a request.

    Attributes:
        kind: ``"text"`` (new text in ``text``), ``"done"`` (``finish_reason`` and the token counts are set) or
            ``"error"`` (``text`` holds the message).
        text: New text, or the error message.
        finish_reason: ``"stop"`` (end-of-text or a stop string) or ``"length"`` (``max_tokens`` or the context).
        prompt_tokens: Tokens of the prompt.
        completion_tokens: Tokens generated (end-of-text not counted).
    """

    kind: str
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class GenerationRequest:
    """One completion to decode.

    Attributes:
        prompt_ids: The prompt's token ids (at least one).
        max_tokens: Most tokens to generate.
        emit: Called from the engine thread with each :class:`Event`; must not block.
        temperature: 0 decodes greedily.
        top_p: Nucleus sampling threshold; None keeps every token.
        seed: Seed of this request's generator; None draws one.
        stop: Strings that end the completion (left out of its text).
    """

    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop decoding this request: it leaves its slot (or the queue) before the next step and emits nothing more."""
        self.cancelled.set()


class TextStream:
    """Turns a request's tokens into text deltas, honouring stop strings.

    Byte-level BPE may split a character over several tokens, so text is released only once it decodes completely;
    text that could be the start of a stop string is held back until it is known not to be one.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""  # decoded text of the tokens up to `pending`
        self.pending: list[int] = []  # tokens whose text is not complete yet
        self.sent = 0  # characters of self.text already released

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; return the text to release and whether a stop string ended the completion."""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd"):
            return "", False  # a character split over tokens: wait for the rest
        self.text += piece
        self.pending = []
        cut = min((at for at in (self.text.find(s, self.sent) for s in self.stop) if at >= 0), default=-1)
        if cut >= 0:
            out = self.text[self.sent : cut]
            self.text = self.text[:cut]
            self.sent = cut
            return out, True
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        end = max(self.sent, len(self.text) - hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out, False

    def finish(self) -> str:
        """Release what was held back (a partial character decodes as U+FFFD)."""
        if self.pending:
            self.text += self.tokenizer.decode(self.pending)
            self.pending = []
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out


@dataclass
class _Row:
    """A request in a decoder slot."""

    request: GenerationRequest
    slot: int
    stream: TextStream
    generator: torch.Generator | None
    position: int = 0  # where `token` is fed next
    token: int = 0  # the token fed at the next step
    generated: int = 0


class Engine:
    """Decodes :class:`GenerationRequest` s on one thread, up to ``slots`` of them together.

    Args:
        model: An eval-mode GPT.
        tokenizer: Its tokenizer (end-of-text id, decoding).
        slots: Requests decoded together at most (the server's ``--max-concurrency``).
        max_queue: Requests waiting for a slot at most; :meth:`submit` refuses more with :class:`QueueFull`.
        mode: How decode steps run (see :data:`lit_llm.model.decoding.DecodeMode`).
        max_len: Most tokens (prompt + completion) per request; default the model's context length.
    """

    def __init__(
        self,
        model: GPTModel,
        tokenizer: Tokenizer,
        *,
        slots: int = 8,
        max_queue: int = 64,
        mode: DecodeMode = "auto",
        max_len: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.decoder = Decoder(model, slots, max_len=max_len, mode=mode)
        self.max_queue = max_queue
        self.device = model.tok_emb.weight.device
        self._waiting: deque[GenerationRequest] = deque()
        self._rows: dict[int, _Row] = {}
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def max_len(self) -> int:
        """Most tokens (prompt + completion) a request can hold."""
        return self.decoder.max_len

    @property
    def slots(self) -> int:
        return self.decoder.slots

    def stats(self) -> dict[str, int]:
        """Requests being decoded and waiting, and the limits."""
        with self._cond:
            return {"active": len(self._rows), "queued": len(self._waiting), "slots": self.slots,
                    "max_queue": self.max_queue}

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> Engine:
        """Start the decoding thread and wait until the decode steps are recorded or compiled."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="lit_llm-engine", daemon=True)
            self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error
        return self

    def close(self) -> None:
        """Fail what is queued or running with "shutting down" and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; its events come through ``request.emit``.

        Raises:
            QueueFull: Every slot is busy and ``max_queue`` requests already wait.
            EngineClosed: The engine is not running.
        """
        with self._cond:
            if self._closing or self._thread is None or not self._thread.is_alive():
                raise EngineClosed("the server is shutting down")
            free = self.slots - len(self._rows)
            if len(self._waiting) >= free + self.max_queue:
                raise QueueFull(
                    f"{len(self._rows)} requests are being decoded and {len(self._waiting)} wait, the server's limit "
                    f"(--max-concurrency {self.slots}, --max-queue {self.max_queue}); retry later"
                )
            self._waiting.append(request)
            self._cond.notify_all()

    # --- the decoding thread -----------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            with torch.no_grad():
                self.decoder.warmup()
        except BaseException as err:  # noqa: BLE001 - reported to start()'s caller
            self._startup_error = err
            self._ready.set()
            return
        self._ready.set()
        while True:
            with self._cond:
                while not self._closing and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._closing:
                    break
                admitted = []
                free = [s for s in range(self.slots) if s not in self._rows]
                while self._waiting and free:
                    request = self._waiting.popleft()
                    if not request.cancelled.is_set():
                        admitted.append((request, free.pop(0)))
                for request, slot in admitted:  # reserve the slots before releasing the lock
                    self._rows[slot] = _Row(request, slot, TextStream(self.tokenizer, request.stop), None)
            try:
                for request, slot in admitted:
                    self._start(self._rows[slot])
                self._leave_cancelled()
                if self._rows:
                    self._step()
            except Exception:  # noqa: BLE001 - a bug here must fail the requests in flight, not the server
                log.exception("the decoding loop failed; failing the requests in flight")
                for row in list(self._rows.values()):
                    self._fail(row, "the server failed while decoding this request")
        self._shut_down()

    def _start(self, row: _Row) -> None:
        """Prefill the request's prompt into its slot and take its first token."""
        request = row.request
        try:
            if request.temperature > 0:
                row.generator = torch.Generator(device=self.device)
                row.generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
            ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
            logits = self.decoder.prefill(row.slot, ids)
            row.position = len(request.prompt_ids)
            self._advance(row, self._sample(logits, [row], [0])[0])
        except Exception as err:  # noqa: BLE001 - one request's failure must not stop the others
            log.exception("request failed while reading its prompt")
            self._fail(row, f"the server failed on this request: {type(err).__name__}: {err}")

    def _step(self) -> None:
        """One decode step for every row."""
        rows = list(self._rows.values())
        n = max(self._rows) + 1
        tokens, positions = [0] * n, [0] * n  # free slots below the last busy one decode a dummy token
        for row in rows:
            tokens[row.slot], positions[row.slot] = row.token, row.position
        try:
            logits = self.decoder.decode(tokens, positions)
            picked = self._sample(logits, rows, [row.slot for row in rows])
        except Exception as err:  # noqa: BLE001 - fail this step's requests, keep serving
            log.exception("decode step failed")
            for row in rows:
                self._fail(row, f"the server failed while decoding: {type(err).__name__}: {err}")
            return
        for row, token in zip(rows, picked):
            row.position += 1
            try:
                self._advance(row, token)
            except Exception as err:  # noqa: BLE001
                log.exception("request failed while streaming")
                self._fail(row, f"the server failed on this request: {type(err).__name__}: {err}")

    def _sample(self, logits: torch.Tensor, rows: list[_Row], index: list[int]) -> list[int]:
        """Each row's next token from its line ``index[i]`` of ``logits``: greedy rows by one argmax over the batch,
        sampling rows with their own generator."""
        vocab = self.decoder.vocab_size
        greedy = logits[:, :vocab].argmax(dim=-1)
        picks: list[torch.Tensor] = []
        for row, r in zip(rows, index):
            request = row.request
            if request.temperature > 0:
                picks.append(sample_next(logits[r : r + 1], vocab_size=vocab, temperature=request.temperature,
                                         top_p=request.top_p, generator=row.generator).reshape(1))
            else:
                picks.append(greedy[r : r + 1])
        return torch.cat(picks).tolist()  # one device-to-host copy per step

    def _advance(self, row: _Row, token: int) -> None:
        """Record a new token of a row: release its text, or finish the row."""
        request = row.request
        if request.cancelled.is_set():
            self._leave(row)
            return
        if token == self.tokenizer.eos_id:
            self._finish(row, "stop")
            return
        row.generated += 1
        text, stopped = row.stream.add(token)
        if text:
            request.emit(Event("text", text))
        if stopped:
            self._finish(row, "stop", flush=False)
        elif row.generated >= request.max_tokens or row.position >= self.max_len:
            self._finish(row, "length")
        else:
            row.token = token

    def _finish(self, row: _Row, reason: str, flush: bool = True) -> None:
        rest = row.stream.finish() if flush else ""
        if rest:
            row.request.emit(Event("text", rest))
        row.request.emit(Event("done", finish_reason=reason, prompt_tokens=len(row.request.prompt_ids),
                               completion_tokens=row.generated))
        self._leave(row)

    def _fail(self, row: _Row, message: str) -> None:
        self._leave(row)
        try:
            row.request.emit(Event("error", message))
        except Exception:  # noqa: BLE001 - the client is gone; nothing to tell it
            log.exception("could not report a failed request")

    def _leave(self, row: _Row) -> None:
        with self._cond:
            if self._rows.get(row.slot) is row:
                del self._rows[row.slot]

    def _leave_cancelled(self) -> None:
        for row in list(self._rows.values()):
            if row.request.cancelled.is_set():
                self._leave(row)

    def _shut_down(self) -> None:
        with self._cond:
            pending = list(self._waiting) + [row.request for row in self._rows.values()]
            self._waiting.clear()
            self._rows.clear()
        for request in pending:
            try:
                request.emit(Event("error", "the server is shutting down"))
            except Exception:  # noqa: BLE001 - the client is gone; nothing to tell it
                pass
