"""Peak memory and tokens/s of DPO's three reference modes beside plain instruction finetuning, on one GPU.

Each variant runs in its own process (so its peak memory is its own) with the task's own code: the step is
``DPOTask.dpo_loss`` (or ``InstructTask.loss``) + backward + AdamW, in bf16 autocast, on random token batches of a
fixed shape. Variants:

- ``instruct`` / ``instruct_lora``: instruction finetuning (InstructTask), full or LoRA, ``2 * batch`` rows;
- ``copy`` / ``precomputed`` (full finetuning) and ``copy_lora`` / ``precomputed_lora`` / ``lora_off`` (LoRA):
  DPO with ``batch`` pairs, i.e. the same ``2 * batch`` rows through the policy per step.

Tokens/s count the rows the policy trains on (``2 * batch * length``) over ``--steps`` timed optimizer steps after
``--warmup``; ``precomputed`` also reports the one-off reference pass over its batches (``precompute_s``).

    python bench/dpo.py --model gpt2-355m --batch 8 --length 512 --json bench/results/dpo-h100-<date>.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("instruct", "instruct_lora", "copy", "precomputed", "copy_lora", "precomputed_lora", "lora_off")
LORA = {"rank": 16, "alpha": 32, "targets": ["attention", "ff"]}


def batches(n: int, batch: int, length: int, vocab: int, device: str) -> list[dict[str, torch.Tensor]]:
    """``n`` random DPO batches: a prompt of ``length // 2`` tokens, then responses filling the rest (prompt masked)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    prompt = length // 2
    for i in range(n):
        item: dict[str, torch.Tensor] = {"index": torch.arange(i * batch, (i + 1) * batch)}
        for key in ("chosen", "rejected"):
            ids = torch.randint(0, vocab, (batch, length + 1), generator=generator)
            targets = ids[:, 1:].clone()
            targets[:, : prompt - 1] = -100
            item[f"{key}_inputs"], item[f"{key}_targets"] = ids[:, :-1], targets
        out.append({k: v.to(device) for k, v in item.items()})
    return out


def one(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one variant in this process."""
    from lit_llm.model.config import PRESETS
    from lit_llm.tasks import DPOTask, InstructTask

    device = "cuda" if torch.cuda.is_available() else "cpu"
    variant = args.variant
    lora = LORA if variant.endswith("lora") or variant == "lora_off" else None
    preset = PRESETS[args.model]
    gpt2 = args.model.startswith("gpt2-")  # OpenAI's GPT-2 layout, as the book's instruction checkpoint
    shape = {**preset, "drop_rate": 0.0, "context_length": max(preset["context_length"], args.length),
             "qkv_bias": gpt2, "tie_weights": gpt2}
    common = dict(model=shape, lora=lora, compile=args.compile)
    if variant.startswith("instruct"):
        module = InstructTask(**common, generate_after_fit=False)
    else:
        module = DPOTask(**common, reference=variant.removesuffix("_lora"), generate_after_fit=False,
                         generate_before_fit=False)
    module.configure_model()
    module.to(device)
    data = batches(args.warmup + args.steps, args.batch, args.length, module.config.vocab_size, device)
    precompute_s = None
    if variant.startswith("precomputed"):
        torch.cuda.synchronize() if device == "cuda" else None
        start = time.perf_counter()
        rows = []
        with torch.autocast(device, dtype=torch.bfloat16):
            for batch in data:
                rows.append(torch.stack(module._starting_model_logprobs(batch), 1).float().cpu())
        module.reference_logprobs = {"train": torch.cat(rows)}
        torch.cuda.synchronize() if device == "cuda" else None
        precompute_s = time.perf_counter() - start
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=device == "cuda")

    def step(batch: dict[str, torch.Tensor]) -> None:
        with torch.autocast(device, dtype=torch.bfloat16):
            if variant.startswith("instruct"):
                inputs = torch.cat([batch["chosen_inputs"], batch["rejected_inputs"]])
                targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
                loss = module.loss(inputs, targets)
            else:
                loss = module.dpo_loss(batch, "train").loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for batch in data[: args.warmup]:
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in data[args.warmup :]:
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = args.steps * 2 * args.batch * args.length
    return {
        "variant": variant,
        "tokens_per_s": tokens / elapsed,
        "step_s": elapsed / args.steps,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "trainable_parameters": sum(p.numel() for p in params),
        "precompute_s": precompute_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-355m")
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (instruct: twice as many rows)")
    parser.add_argument("--length", type=int, default=512, help="tokens per row (prompt half, response half)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one variant, in a child process
    parser.add_argument("--json", type=Path, default=None, help="write the results here (default: bench/results/)")
    args = parser.parse_args(argv)
    if args.variant:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    results = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--batch", str(args.batch),
               "--length", str(args.length), "--steps", str(args.steps), "--warmup", str(args.warmup),
               *(["--compile"] if args.compile else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        result = json.loads(lines[-1][7:]) if lines else {"variant": variant, "error": proc.stderr[-2000:]}
        print(json.dumps(result), flush=True)
        results.append(result)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "device": device,
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "model": args.model,
              "batch_pairs": args.batch, "length": args.length, "precision": "bf16 autocast", "results": results}
    path = args.json or ROOT / "bench" / "results" / f"dpo-{time.strftime('%Y-%m-%d')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
