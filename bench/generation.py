"""Greedy decoding speed: lit_llm's KV-cache ``generate`` against the book's cache-less loop, on the same model.

The book's ``generate_text_simple`` (chapter 4) re-runs the whole sequence (cropped to the context) for every new
token; with the cache each step feeds only the newest token. Both decode greedily from the same random-weight
model, so their tokens must agree, and the script checks that they do. Prints one JSON object (docs/benchmarks.md):

    python bench/generation.py                                    # GPT-2 124M shape, CPU, fp32
    python bench/generation.py --device cuda --dtype bfloat16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lit_llm.model.config import GPTConfig
from lit_llm.model.gpt import GPTModel
from lit_llm.model.sampling import generate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.no_grad()
def book_loop(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """The book's greedy loop: run the (cropped) sequence, take the last position's argmax, append, repeat."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :]
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx


def timed(
    fn: Callable[[int], torch.Tensor], n: int, device: torch.device, repeats: int
) -> tuple[list[float], torch.Tensor]:
    """Seconds of each of ``repeats`` runs of ``fn(n)`` after a short warm-up run, and the last run's output."""
    fn(min(n, 8))  # warm-up: allocator, kernels, thread pools (short: the book's loop is slow on a CPU)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn(n)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2-124m", help="model shape (lit_llm.model.config.PRESETS); random weights")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each method (after one warm-up)")
    p.add_argument("--book-repeats", type=int, default=None, help="timed runs of the book's loop (default: --repeats)")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    a = p.parse_args(argv)

    if a.threads is not None:
        torch.set_num_threads(a.threads)

    device = torch.device(a.device)
    torch.manual_seed(a.seed)
    # GPT-2's own shape: tied head, qkv bias; dropout is irrelevant in eval mode.
    cfg = GPTConfig.from_name(a.preset, qkv_bias=True, tie_weights=True)
    with torch.device(device):
        model = GPTModel(cfg)
    model = model.to(DTYPES[a.dtype]).eval()
    idx = torch.randint(0, cfg.vocab_size, (a.batch_size, a.prompt_tokens), device=device)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    book_times, book_out = timed(
        lambda n: book_loop(model, idx, n, cfg.context_length), a.new_tokens, device, a.book_repeats or a.repeats
    )
    cache_times, cache_out = timed(lambda n: generate(model, idx, n, use_cache=True), a.new_tokens, device, a.repeats)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    new = a.batch_size * a.new_tokens

    def summary(times: list[float]) -> dict:
        med = statistics.median(times)
        return {"seconds": [round(t, 4) for t in times], "median_s": round(med, 4), "tokens_per_s": round(new / med, 2)}

    result = {
        "preset": a.preset,
        "parameters": model.num_parameters(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": a.dtype,
        "torch": torch.__version__,
        "batch_size": a.batch_size,
        "prompt_tokens": a.prompt_tokens,
        "new_tokens": a.new_tokens,
        "book_loop": summary(book_times),
        "kv_cache": summary(cache_times),
        "speedup": round(statistics.median(book_times) / statistics.median(cache_times), 2),
        # Greedy tokens of the two methods; in fp32 they agree, in bf16 near-ties may break differently.
        "same_tokens": bool(torch.equal(book_out, cache_out)),
        # 1-minute load average: other work on the machine slows the CPU numbers down.
        "loadavg_before_after": [load_before, load_after],
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
