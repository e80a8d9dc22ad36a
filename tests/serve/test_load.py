"""A bounded load test on 127.0.0.1: 32 concurrent streaming clients, a fixed count of requests, against
``lit-llm serve``: no errors, every stream complete, p50/p95 latency printed, the server's memory flat."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

pytest.importorskip("fastapi", reason="the server's tests need the serve extra: pip install -e '.[dev]'")
pytest.importorskip("uvicorn", reason="the server's tests need the serve extra: pip install -e '.[dev]'")

openai = pytest.importorskip("openai", reason="the load test uses the openai client: pip install -e '.[dev]'")
psutil = pytest.importorskip("psutil")

CLIENTS = 32
REQUESTS = 160
MAX_TOKENS = 24


async def _one(client, i: int) -> tuple[float, float, int, str | None]:
    """(latency, time to first token, completion tokens, finish reason) of one streamed request."""
    start = time.perf_counter()
    first = None
    stream = await client.completions.create(
        model="tiny-gpt", prompt=f"Request {i}: the import statement", max_tokens=MAX_TOKENS, temperature=0.8,
        seed=i, stream=True, stream_options={"include_usage": True},
    )
    usage, reason, text = None, None, ""
    async for chunk in stream:
        if chunk.choices:
            if chunk.choices[0].text and first is None:
                first = time.perf_counter() - start
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and reason in ("stop", "length"), f"request {i} ended without its final chunks"
    return time.perf_counter() - start, first or 0.0, usage.completion_tokens, reason


async def _round(url: str, count: int) -> list[tuple[float, float, int, str | None]]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(CLIENTS)

    async def limited(i: int):
        async with gate:
            return await _one(client, i)

    try:
        return await asyncio.gather(*(limited(i) for i in range(count)))
    finally:
        await client.close()


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def test_32_concurrent_streaming_clients(server, web):
    """The shared server decodes 16 requests together and queues the others."""
    process = psutil.Process(server.process.pid)
    asyncio.run(_round(server.url, CLIENTS))  # warm up: allocator pools, code paths
    before = process.memory_info().rss
    start = time.perf_counter()
    results = asyncio.run(_round(server.url, REQUESTS))
    elapsed = time.perf_counter() - start
    after = process.memory_info().rss
    health = web.get_json(server.url + "/health")
    latencies = [r[0] for r in results]
    first = [r[1] for r in results]
    tokens = sum(r[2] for r in results)
    p50, p95 = _percentile(latencies, 50), _percentile(latencies, 95)
    f50, f95 = _percentile(first, 50), _percentile(first, 95)
    print(f"\n{REQUESTS} streamed requests, {CLIENTS} concurrent clients: {elapsed:.1f} s, "
          f"{tokens / elapsed:.0f} tokens/s; latency p50 {p50:.3f} s p95 {p95:.3f} s; "
          f"first token p50 {f50:.3f} s p95 {f95:.3f} s; server RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB")
    assert len(results) == REQUESTS
    assert all(r[2] >= 1 or r[3] == "stop" for r in results)
    assert health["active"] == 0 and health["queued"] == 0
    assert after - before < 40 * 2**20, f"server memory grew by {(after - before) / 2**20:.0f} MiB"
