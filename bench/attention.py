"""Fused-attention kernels on this GPU: forward + backward time of each ``scaled_dot_product_attention`` backend at a
model's attention shape, eager and compiled, and the kernels that actually ran.

``model.speed.sdpa_backend`` (``auto``, ``flash``, ``cudnn``, ``efficient``) picks the kernel of the training step; this
measures what each choice is worth, in isolation, before a whole training run is spent on it.

    python bench/attention.py --model gpt2-124m --batch 64 --json attention.json

q, k and v are laid out as the model makes them (one fused qkv projection viewed as ``(B, T, 3, H, D)`` and permuted),
in bf16, causal. FLOPs count the causal half of the score matrix: forward ``2 * 2 * B * H * T^2 * D / 2``, backward
2.5 times that. Kernel names come from one profiled call, so a backend that silently fell back to another shows up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_llm.model.config import PRESETS  # noqa: E402
from lit_llm.tasks.base import sdpa_backend_context  # noqa: E402

BACKENDS = ("flash", "cudnn", "efficient")


def split_heads(qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v ``(B, H, T, D)`` as views of one ``(B, T, 3, H, D)`` projection, as ``MultiHeadAttention`` makes them."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def causal_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    forward = 2 * 2 * batch * heads * seq * seq * head_dim / 2
    return forward * 3.5  # forward + backward (2.5 x forward)


def time_backend(backend: str, compiled: bool, batch: int, heads: int, seq: int, head_dim: int, iters: int,
                 warmup: int, device: str) -> dict[str, Any]:
    torch._dynamo.reset()

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    fn = torch.compile(attend) if compiled else attend
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(batch, heads, seq, head_dim, device=device, dtype=torch.bfloat16)

    def step() -> None:
        with sdpa_backend_context(backend):  # type: ignore[arg-type]
            out = fn(*split_heads(qkv))
        out.backward(grad)
        qkv.grad = None

    record: dict[str, Any] = {"backend": backend, "compiled": compiled}
    try:
        for _ in range(warmup):
            step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        names = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / iters * 1e3
    except Exception as e:  # noqa: BLE001 - a backend that cannot run this shape is a result, not a crash
        record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return record
    record.update(ms=round(ms, 3), tflops=round(causal_flops(batch, heads, seq, head_dim) / ms / 1e9, 1),
                  kernels=[n[:100] for n in names if "attention" in n.lower() or "flash" in n.lower()
                           or "fmha" in n.lower() or "cudnn" in n.lower() or "sdpa" in n.lower()] or names[:8])
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-124m", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, help="sequence length (default: the model's context length)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark times GPU attention kernels; no CUDA device is visible")
    shape = PRESETS[args.model]
    heads, seq = shape["n_heads"], args.seq or shape["context_length"]
    head_dim = shape["emb_dim"] // heads
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  B={args.batch} H={heads} T={seq} D={head_dim}",
          flush=True)
    results = []
    for compiled in (False, True):
        for backend in BACKENDS:
            r = time_backend(backend, compiled, args.batch, heads, seq, head_dim, args.iters, args.warmup, "cuda")
            results.append(r)
            label = f"{backend:10s} {'compiled' if compiled else 'eager':8s}"
            print(label, r.get("error") or f"{r['ms']:8.3f} ms  {r['tflops']:6.1f} TFLOP/s  {r['kernels']}", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "model": args.model, "batch": args.batch, "heads": heads, "seq": seq, "head_dim": head_dim,
           "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
