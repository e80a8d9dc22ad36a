"""Serving speed: lit_llm's fast decoding against Hugging Face ``transformers``' ``generate``, and batched serving
against sequential serving. One invocation measures everything ``docs/benchmarks.md`` shows for ``lit-llm serve``:

1. **Batch-1 greedy decoding**, per model (GPT-2 124M and 355M shapes, random weights, fp32): time to first token
   and decode tokens/s of lit_llm's static-cache decoder (what ``serve`` and ``generate --fast`` run: a CUDA graph
   replayed per step on GPUs, eager on CPUs), of lit_llm's growing-cache loop (``generate`` without ``--fast``), and
   of ``transformers``' ``GPT2LMHeadModel.generate`` on the same weights exported with ``to-hf``. The tokens of all
   three are compared.
2. **Aggregate tokens/s** of the serving engine with 1, 8 and 32 concurrent clients (each sends its next request
   when its previous one is done), against sequential serving (one slot: requests decoded one after another), with
   per-request latency p50/p95.

On a GPU machine it measures the GPU (124M and 355M) and then the CPU (124M, shorter runs); on a CPU-only machine the
CPU part only. Writes ``bench/results/serve-<device>-<date>.json`` and prints it.

    python bench/serve.py                      # GPU machine: the whole table (about 10 minutes on one H100)
    python bench/serve.py --cpu-only --new-tokens 32 --requests 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from lit_llm.model.config import PRESETS, GPTConfig
from lit_llm.model.decoding import Decoder
from lit_llm.model.gpt import GPTModel
from lit_llm.model.sampling import generate
from lit_llm.serve.engine import Engine, Event, GenerationRequest
from lit_llm.weights.export import export_hf

RESULTS = Path(__file__).resolve().parent / "results"


class _Ids:
    """The engine's tokenizer needs only an end-of-text id and ``decode``; ids as text keeps the count exact."""

    eos_id = -1  # never produced: every request runs to max_tokens

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids)) + " "


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls (after one warm-up call) and the last result."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


@torch.no_grad()
def _static_greedy(decoder: Decoder, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy batch-1 decoding with a persistent decoder, as the server runs it."""
    vocab = decoder.vocab_size
    nxt = decoder.prefill(0, idx)[:, :vocab].argmax(-1)
    out = [nxt]
    pos = idx.shape[1]
    for _ in range(n - 1):
        nxt = decoder.decode(nxt, [pos])[:, :vocab].argmax(-1)
        pos += 1
        out.append(nxt)
    return torch.stack(out, dim=1)


def batch1(preset: str, device: torch.device, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """Time to first token and decode tokens/s of the three decoders, and whether their tokens agree."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = GPTConfig(**PRESETS[preset], drop_rate=0.0, qkv_bias=True, tie_weights=True)
    model = GPTModel(config).to(device).eval()
    idx = torch.randint(0, config.vocab_size, (1, prompt_tokens), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32).to(device).eval()

    def hf_generate(n: int) -> torch.Tensor:
        with torch.no_grad():
            out = hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                              attention_mask=torch.ones_like(idx))
        return out[:, prompt_tokens:]

    decoder = Decoder(model, slots=1)
    runs = {
        "lit_llm_static": lambda n: _static_greedy(decoder, idx, n),
        "lit_llm_growing_cache": lambda n: generate(model, idx, n)[:, prompt_tokens:],
        "transformers_generate": hf_generate,
    }
    out: dict = {"preset": preset, "device": str(device), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                 "decode_mode": decoder.mode, "dtype": "float32"}
    tokens = {}
    for name, run in runs.items():
        ttft, _ = _timed(lambda run=run: run(1), device, repeats)
        total, result = _timed(lambda run=run: run(new_tokens), device, repeats)
        tokens[name] = result.reshape(-1).tolist()
        out[name] = {"ttft_s": round(ttft, 5), "total_s": round(total, 4),
                     "decode_tokens_per_s": round((new_tokens - 1) / max(total - ttft, 1e-9), 1)}
    reference = tokens["lit_llm_growing_cache"]
    for name in ("lit_llm_static", "transformers_generate"):
        same = sum(a == b for a, b in zip(tokens[name], reference))
        out[name]["same_tokens_as_growing_cache"] = f"{same}/{len(reference)}"
    out["speedup_vs_transformers"] = round(out["lit_llm_static"]["decode_tokens_per_s"]
                                           / out["transformers_generate"]["decode_tokens_per_s"], 2)
    return out


def serving(preset: str, device: torch.device, prompt_tokens: int, new_tokens: int, requests: int,
            levels: list[int]) -> dict:
    """Aggregate tokens/s and latency of the engine for each number of concurrent clients, and sequentially."""
    torch.manual_seed(0)
    config = GPTConfig(**PRESETS[preset], drop_rate=0.0, qkv_bias=True, tie_weights=True)
    model = GPTModel(config).to(device).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (prompt_tokens,), generator=g).tolist() for _ in range(requests)]
    out: dict = {"preset": preset, "device": str(device), "requests": requests, "prompt_tokens": prompt_tokens,
                 "max_tokens": new_tokens}
    sequential = Engine(model, _Ids(), slots=1, max_queue=requests).start()
    out["sequential"] = _drive(sequential, prompts, new_tokens, clients=1)
    sequential.close()
    del sequential
    batched = Engine(model, _Ids(), slots=max(levels), max_queue=requests).start()
    _drive(batched, prompts[: max(levels)], 8, clients=max(levels))  # warm-up
    out["decode_mode"] = batched.decoder.mode
    for clients in levels:
        result = _drive(batched, prompts, new_tokens, clients=clients)
        result["vs_sequential"] = round(result["tokens_per_s"] / out["sequential"]["tokens_per_s"], 2)
        out[f"clients_{clients}"] = result
    batched.close()
    return out


def _drive(engine: Engine, prompts: list[list[int]], max_tokens: int, clients: int) -> dict:
    """``clients`` threads each send their next prompt when their previous one is done."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    work = list(enumerate(prompts))

    def client() -> None:
        while True:
            with lock:
                if not work:
                    return
                _, ids = work.pop()
            done = threading.Event()
            result: list[Event] = []

            def emit(event: Event) -> None:
                if event.kind != "text":
                    result.append(event)
                    done.set()

            start = time.perf_counter()
            engine.submit(GenerationRequest(ids, max_tokens=max_tokens, emit=emit))
            done.wait()
            if result[0].kind != "done":
                raise RuntimeError(result[0].text)
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += result[0].completion_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"clients": clients, "seconds": round(elapsed, 3), "tokens": tokens[0],
            "tokens_per_s": round(tokens[0] / elapsed, 1), "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p95_s": round(q[18], 3)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-only", action="store_true", help="skip the GPU part even when a GPU is present")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128, help="new tokens per request on the GPU")
    p.add_argument("--requests", type=int, default=64, help="requests per serving measurement on the GPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu-new-tokens", type=int, default=32, help="new tokens per request on the CPU")
    p.add_argument("--cpu-requests", type=int, default=16, help="requests per serving measurement on the CPU")
    p.add_argument("--levels", default="1,8,32", help="concurrent clients to measure")
    p.add_argument("--gpu-presets", default="gpt2-124m,gpt2-355m", help="model shapes measured on the GPU")
    p.add_argument("--cpu-preset", default="gpt2-124m", help="model shape measured on the CPU")
    p.add_argument("--out", default=None, help="JSON file (default: bench/results/serve-<device>-<date>.json)")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    report: dict = {"date": dt.date.today().isoformat(), "torch": torch.__version__, "host": platform.node(),
                    "cpu_threads": torch.get_num_threads(), "gpu": None, "gpu_runs": [], "cpu_runs": []}
    if torch.cuda.is_available() and not args.cpu_only:
        device = torch.device("cuda")
        report["gpu"] = torch.cuda.get_device_name(device)
        for preset in args.gpu_presets.split(","):
            report["gpu_runs"].append(batch1(preset, device, args.prompt_tokens, args.new_tokens, args.repeats))
            print(json.dumps(report["gpu_runs"][-1]), flush=True)
            report["gpu_runs"].append(serving(preset, device, args.prompt_tokens, args.new_tokens, args.requests,
                                              levels))
            print(json.dumps(report["gpu_runs"][-1]), flush=True)
    cpu = torch.device("cpu")
    report["cpu_runs"].append(batch1(args.cpu_preset, cpu, args.prompt_tokens, args.cpu_new_tokens, args.repeats))
    print(json.dumps(report["cpu_runs"][-1]), flush=True)
    report["cpu_runs"].append(serving(args.cpu_preset, cpu, args.prompt_tokens, args.cpu_new_tokens, args.cpu_requests,
                                      levels))
    print(json.dumps(report["cpu_runs"][-1]), flush=True)
    kind = "cpu" if report["gpu"] is None else report["gpu"].replace("NVIDIA ", "").split()[0].lower()
    path = Path(args.out) if args.out else RESULTS / f"serve-{kind}-{report['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
