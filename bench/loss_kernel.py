"""The cross-entropy over a batch's logits, alone: the fused loss's Triton kernel under launch settings, against
the compiled plain loss (``F.cross_entropy`` of the float32-cast logits, forward and backward, as ``torch.compile``
builds it inside the training step).

    python bench/loss_kernel.py --tokens 65536 --vocab 50304 --json loss_kernel.json

The matmuls on either side are the same in both paths and are left out. Each row of the output gives the time of one
loss forward + backward over (tokens x vocabulary) bf16 logits, the bytes it must move at least (the logits read
once, their gradient written once) per second of it, and the loss's difference from the reference's.
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


def _time(fn: Any, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def configs(sms: int) -> list[dict[str, Any]]:
    """Launch settings to try: one program per row, or a few programs per multiprocessor walking the rows."""
    out: list[dict[str, Any]] = []
    for block, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 8), (16384, 16),
                         (16384, 32), (32768, 16), (32768, 32), (65536, 32)):
        out.append({"block": block, "num_warps": warps, "programs": None})
    for per_sm in (1, 2, 8):
        for block, warps in ((4096, 8), (8192, 16), (16384, 16)):
            out.append({"block": block, "num_warps": warps, "programs": per_sm * sms})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536, help="rows of logits (micro-batch x sequence)")
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark times GPU kernels; no CUDA device is visible")
    from lit_llm.model.fused_loss import _loss_and_gradient_in_place

    torch.manual_seed(0)
    n, v = args.tokens, args.vocab
    logits = (torch.randn(n, v, device="cuda") * 2).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[::97] = -100
    min_bytes = 2 * n * v * logits.element_size()  # read the logits once, write their gradient once

    ref_logits = logits.clone().requires_grad_()

    def plain_loss(z: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(z.float(), targets, ignore_index=-100)

    compiled = torch.compile(plain_loss)

    def reference() -> torch.Tensor:
        ref_logits.grad = None
        loss = compiled(ref_logits)
        loss.backward()
        return loss

    ref_value = float(reference())
    ref_grad = ref_logits.grad.clone()
    rows: list[dict[str, Any]] = []
    ms = _time(reference, args.iters, args.warmup)
    rows.append({"kernel": "compiled F.cross_entropy (forward + backward)", "ms": round(ms, 3),
                 "gb_per_s": round(min_bytes / ms / 1e6, 1), "loss_error": 0.0})
    print(f"{rows[-1]['kernel']:48s} {ms:8.3f} ms  {rows[-1]['gb_per_s']:7.1f} GB/s", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    work = torch.empty_like(logits)
    for cfg in configs(sms):
        label = f"fused block {cfg['block']} warps {cfg['num_warps']} programs {cfg['programs'] or 'per row'}"
        work.copy_(logits)
        loss = float(_loss_and_gradient_in_place(work, targets, -100, **cfg))
        grad_error = float((work - ref_grad).abs().max())
        # Timed on the gradient it left behind: the work per element does not depend on the values.
        ms = _time(lambda cfg=cfg: _loss_and_gradient_in_place(work, targets, -100, **cfg), args.iters, args.warmup)
        rows.append({"kernel": label, **cfg, "ms": round(ms, 3), "gb_per_s": round(min_bytes / ms / 1e6, 1),
                     "loss_error": abs(loss - ref_value), "grad_max_error": grad_error})
        print(f"{label:48s} {ms:8.3f} ms  {rows[-1]['gb_per_s']:7.1f} GB/s  loss err {abs(loss - ref_value):.2e}  "
              f"grad err {grad_error:.2e}", flush=True)
    out = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "tokens": n, "vocab": v, "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
