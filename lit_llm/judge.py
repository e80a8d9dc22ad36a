"""``python -m lit_llm.judge``: score a model's test responses with a larger LLM, as the book's chapter 7 does.

    python -m lit_llm.judge checkpoints/instruct/test_responses.json --url http://localhost:11434 --model llama3
    python -m lit_llm.judge RESPONSES.json --api openai --url https://api.openai.com --model gpt-4o-mini \\
        --api-key-env OPENAI_API_KEY

For each record of the responses file (the JSON list ``InstructTask`` writes: the test records with a
``model_response`` field) the judge model gets the book's scoring prompt::

    Given the input `<the Alpaca-formatted instruction and input>` and correct output `<output>`, score the model
    response `<model_response>` on a scale from 0 to 100, where 100 is the best score. Respond with the integer
    number only.

A reply that is an integer from 0 to 100 (surrounding whitespace and a final period allowed) is a score; any other
reply is counted as failed and listed with its record. The average of the scores, the failures and every reply are
written to ``<RESPONSES stem>_judge.json`` (or ``--output``).

``--api ollama`` (the default) posts to Ollama's ``/api/chat`` with the book's options (seed 123, temperature 0,
``num_ctx`` 2048) and reads a streamed or a single reply; ``--api openai`` posts to ``/v1/chat/completions`` of any
OpenAI-compatible server (vLLM, llama.cpp, LM Studio, OpenAI), with a bearer key read from the environment variable
``--api-key-env`` when it is set. Mistakes print one ``error: ...`` line and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lit_llm.cli import CommandParser, entry_point, run_command, warn
from lit_llm.data.prompts import TEMPLATES
from lit_llm.errors import ConfigError, DataError, LitLLMError

Api = Literal["ollama", "openai"]
_SCORE = re.compile(r"\s*(\d{1,3})\s*\.?\s*")


class JudgeConnectionError(LitLLMError):
    """The judge's server could not be reached or answered with an error."""


def scoring_prompt(
    record: dict[str, Any],
    response_field: str = "model_response",
    *,
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
) -> str:
    """The book's scoring prompt for one record (its ``format_input`` is the Alpaca instruction and input).

    Raises:
        KeyError: A field is missing from ``record``.
    """
    formatted = TEMPLATES["alpaca"].format_input(str(record[instruction_field]), str(record.get(input_field) or ""))
    return (
        f"Given the input `{formatted}` "
        f"and correct output `{record[output_field]}`, "
        f"score the model response `{record[response_field]}`"
        " on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


def parse_score(reply: str) -> int | None:
    """The integer score in ``reply``, or None when the reply is not just an integer from 0 to 100."""
    match = _SCORE.fullmatch(reply)
    if match is None:
        return None
    score = int(match.group(1))
    return score if 0 <= score <= 100 else None


def chat_url(url: str, api: Api) -> str:
    """The chat endpoint under a server's base ``url`` (a full endpoint URL is kept as it is)."""
    base = url.rstrip("/")
    if api == "ollama":
        return base if base.endswith("/api/chat") else f"{base}/api/chat"
    if base.endswith("/chat/completions"):
        return base
    return f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"


def query(
    prompt: str, *, url: str, model: str, api: Api = "ollama", api_key: str | None = None, timeout: float = 120.0,
    seed: int = 123,
) -> str:
    """Send ``prompt`` as one user message to the judge and return its reply text.

    Raises:
        JudgeConnectionError: The server is unreachable, answers with an HTTP error, or sends no reply text.
    """
    endpoint = chat_url(url, api)
    messages = [{"role": "user", "content": prompt}]
    if api == "ollama":
        # The book's settings, for deterministic replies.
        body: dict[str, Any] = {"model": model, "messages": messages, "stream": False,
                                "options": {"seed": seed, "temperature": 0, "num_ctx": 2048}}
    else:
        body = {"model": model, "messages": messages, "temperature": 0, "seed": seed}
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode("utf-8"), method="POST")
    request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace")[:300]
        raise JudgeConnectionError(
            f"the judge at {endpoint} answered HTTP {err.code} {err.reason}: {detail.strip()}. Check --model "
            f"{model!r} (for Ollama: `ollama pull {model}`), --api and the API key."
        ) from err
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        how = ("start Ollama with `ollama serve` (and `ollama pull " + model + "`)" if api == "ollama"
               else "start the OpenAI-compatible server")
        raise JudgeConnectionError(
            f"could not reach the judge at {endpoint} ({reason}); {how}, or pass --url with the server's address."
        ) from err
    return _reply_text(text, api, endpoint)


def _reply_text(text: str, api: Api, endpoint: str) -> str:
    """The message content of a reply: Ollama's one JSON object or its stream of JSON lines, or OpenAI's choices."""
    try:
        if api == "openai":
            return str(json.loads(text)["choices"][0]["message"]["content"])
        pieces = [json.loads(line) for line in text.splitlines() if line.strip()]
        errors = [p["error"] for p in pieces if "error" in p]
        if errors:
            raise JudgeConnectionError(f"the judge at {endpoint} answered with an error: {errors[0]}")
        if not any("message" in p for p in pieces):
            raise KeyError("message")
        # A streamed reply is many objects, each with a piece of the message; the last may carry none.
        return "".join(str(p["message"]["content"]) for p in pieces if "message" in p)
    except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as err:
        raise JudgeConnectionError(
            f"the judge at {endpoint} sent a reply that is not a {api} chat response ({type(err).__name__}: {err}): "
            f"{text[:200]!r}. Check --api."
        ) from err


@dataclass
class JudgeReport:
    """What judging a responses file found."""

    scores: list[int | None] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)

    @property
    def scored(self) -> list[int]:
        return [s for s in self.scores if s is not None]

    @property
    def failed(self) -> list[int]:
        """Indices of the records whose reply was no integer score."""
        return [i for i, s in enumerate(self.scores) if s is None]

    @property
    def average(self) -> float | None:
        return sum(self.scored) / len(self.scored) if self.scored else None

    def to_dict(self, **meta: Any) -> dict[str, Any]:
        return {
            **meta, "n_records": len(self.scores), "n_scored": len(self.scored), "n_failed": len(self.failed),
            "average_score": self.average, "failed": self.failed,
            "records": [
                {"index": i, "score": s, "reply": r} for i, (s, r) in enumerate(zip(self.scores, self.replies))
            ],
        }


def judge_records(
    records: Sequence[dict[str, Any]], ask: Callable[[str], str], response_field: str = "model_response",
    progress: Callable[[int, int], Any] | None = None, **fields: str,
) -> JudgeReport:
    """Score every record with ``ask`` (a prompt -> reply function, e.g. :func:`query` with its settings bound).

    Args:
        records: Test records with ``instruction``, ``input``, ``output`` and ``response_field``.
        ask: Sends one prompt to the judge and returns the reply.
        response_field: The field holding the model's response.
        progress: Called with ``(done, total)`` after each record.
        **fields: ``instruction_field``, ``input_field``, ``output_field`` when the records name them differently.

    Raises:
        DataError: A record lacks a field (its index and the field are named).
    """
    required = [fields.get("instruction_field", "instruction"), fields.get("output_field", "output"), response_field]
    for i, record in enumerate(records):
        missing = [f for f in required if not isinstance(record, dict) or f not in record]
        if missing:
            raise DataError(f"record {i} of the responses file has no {missing[0]!r} field; the judge needs "
                            f"{required} in every record (write the file with lit_llm's InstructTask, or name the "
                            "fields with --instruction-field / --output-field / --response-field)")
    report = JudgeReport()
    for i, record in enumerate(records):
        reply = ask(scoring_prompt(record, response_field, **fields))
        report.replies.append(reply)
        report.scores.append(parse_score(reply))
        if progress is not None:
            progress(i + 1, len(records))
    return report


def read_responses(path: str | Path) -> list[dict[str, Any]]:
    """The records of a responses file (a JSON list of objects).

    Raises:
        DataError: The file is missing, not JSON, or not a non-empty list.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"responses file {str(path)!r} does not exist (cwd: {Path.cwd()}); it is written by fit with "
                        "model.generate_after_fit (test_responses.json in the run folder) or by predict")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(data, list) or not data:
        raise DataError(f"{path} must hold a non-empty JSON list of records, got {type(data).__name__}")
    return data


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m lit_llm.judge``."""
    p = CommandParser(prog="python -m lit_llm.judge",
                description="Score instruction responses 0-100 with an LLM judge (Ollama or OpenAI-compatible).")
    p.add_argument("responses", help="responses JSON (a list of records with model_response), e.g. test_responses.json")
    p.add_argument("--url", default="http://localhost:11434", help="the judge server's base URL (default: %(default)s)")
    p.add_argument("--model", default="llama3", help="the judge model's name (default: %(default)s)")
    p.add_argument("--api", choices=["ollama", "openai"], default="ollama",
                   help="ollama: /api/chat; openai: /v1/chat/completions (default: %(default)s)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding a bearer API key, sent when set (default: %(default)s)")
    p.add_argument("--output", default=None, help="scores file (default: <RESPONSES stem>_judge.json beside it)")
    p.add_argument("--response-field", default="model_response", help="field of the model's response")
    p.add_argument("--instruction-field", default="instruction")
    p.add_argument("--input-field", default="input")
    p.add_argument("--output-field", default="output")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each reply")
    p.add_argument("--seed", type=int, default=123, help="the judge's sampling seed (default: %(default)s)")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Judge the responses file that ``args`` name, write the scores file and return its content."""
    if args.timeout <= 0:
        raise ConfigError(f"--timeout {args.timeout} must be > 0 seconds")
    records = read_responses(args.responses)
    api_key = os.environ.get(args.api_key_env) if args.api == "openai" and args.api_key_env else None

    def ask(prompt: str) -> str:
        return query(prompt, url=args.url, model=args.model, api=args.api, api_key=api_key, timeout=args.timeout,
                     seed=args.seed)

    def progress(done: int, total: int) -> None:
        print(f"\rScoring entries: {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    fields = {"instruction_field": args.instruction_field, "input_field": args.input_field,
              "output_field": args.output_field}
    report = judge_records(records, ask, args.response_field, progress=progress, **fields)
    for i in report.failed:
        warn(f"record {i}: could not read a score from the reply {report.replies[i][:80]!r}")
    out = Path(args.output) if args.output else Path(args.responses).with_name(
        f"{Path(args.responses).stem}_judge.json")
    summary = report.to_dict(responses=str(args.responses), url=args.url, api=args.api, model=args.model)
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    average = "n/a" if report.average is None else f"{report.average:.2f}"
    print(f"Number of scores: {len(report.scored)} of {len(records)} ({len(report.failed)} failed)")
    print(f"Average score: {average}")
    print(f"Wrote {out}")
    return summary


def main(argv: Iterable[str] | None = None) -> int:
    """Run ``python -m lit_llm.judge`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    return run_command(lambda: run(build_parser().parse_args(None if argv is None else list(argv))))


if __name__ == "__main__":
    entry_point(main)
