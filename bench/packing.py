"""Instruction finetuning with packed rows against the book's padded batches: tokens/s and epoch time, one GPU.

Both runs train the same examples with the same model, loss, optimizer and precision, through lit_llm's own pieces:
``InstructTask.loss`` (compiled with ``--compile true``), the book's collate (``InstructionCollate``) for the padded
batches, and ``lit_llm.data.packed`` (``PackedDataset`` + ``PackedCollate``, FlexAttention on CUDA) for the packed
ones. By default a packed batch of ``--rows`` rows takes as many examples per step, on average, as a padded batch
(``--padded-batch`` derived from the packing), so an epoch has the same number of optimizer steps either way and
only the padding differs.

Example lengths follow the book's ``instruction-data.json`` (prompt 44 +- 7 GPT-2 tokens with the Alpaca template,
response 12 +- 7, total 40 to 91; mean 56): ``--lengths builtin`` draws them from a generator of that shape;
``--lengths FILE`` reads the records of a JSON file (instruction / input / output), tokenizes them with
``--tokenizer`` and draws ``--examples`` examples from their lengths. Token ids are random (speed does not depend on
them).

Timed: after ``--warmup`` untimed steps (compilation), one whole epoch between two device synchronisations
(``--steps 0``), or ``--steps N`` steps with the epoch time extrapolated from them (``epoch_measured: false``).
Reported per run: tokens/s over all token slots, over the examples' tokens (slots minus padding) and over the
trained tokens (targets that count in the loss), the share of slots holding tokens, step time and epoch time.

    python bench/packing.py                                   # GPU: GPT-2 124M, built-in lengths
    python bench/packing.py --lengths ../shared/data/instruction-data.json --tokenizer ../shared/data/gpt2
    python bench/packing.py --device cpu --model tiny --examples 300 --max-length 256 --steps 3   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lit_llm.data.collate import InstructionCollate  # noqa: E402
from lit_llm.data.instruct import Examples  # noqa: E402
from lit_llm.data.packed import PackedCollate, PackedDataset, instruction_item  # noqa: E402
from lit_llm.data.sampler import ResumableSampler  # noqa: E402
from lit_llm.model.config import GPTConfig  # noqa: E402
from lit_llm.tasks import InstructTask  # noqa: E402
from lit_llm.tasks.optim import build_adamw, parameter_groups  # noqa: E402

EOS = 50256  # GPT-2's end-of-text: the padding id; never drawn as a token of an example


def builtin_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (prompt tokens, total tokens) pairs shaped like the book's 1,100 records with GPT-2's BPE and the Alpaca
    template: prompts 35-65 tokens (mean 44, sd 7), responses 1-50 (mean 12, sd 7, skewed right)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = min(max(round(rng.gauss(44, 6.5)), 35), 65)
        response = min(max(round(rng.lognormvariate(math.log(10.5), 0.5)), 1), 50)
        out.append((prompt, prompt + response))
    return out


def file_lengths(path: str, tokenizer: str, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (prompt, total) pairs drawn (with replacement, seeded) from the records of a JSON file."""
    from lit_llm.data.prompts import format_prompt
    from lit_llm.data.tokenizer import load_tokenizer

    records = json.loads(Path(path).read_text(encoding="utf-8"))
    tok = load_tokenizer(tokenizer)
    prompts = tok.encode_batch([format_prompt("alpaca", r["instruction"], r.get("input") or "") for r in records])
    outputs = tok.encode_batch([r["output"] for r in records])
    pairs = [(len(p), len(p) + len(o)) for p, o in zip(prompts, outputs)]
    rng = random.Random(seed)
    return [rng.choice(pairs) for _ in range(n)]


def make_examples(lengths: list[tuple[int, int]], eos: int, max_length: int, seed: int = 0) -> Examples:
    """Random token ids below ``eos`` (so end-of-text marks padding only) of the given lengths, cut to
    ``max_length``."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, eos, (min(total, max_length),), generator=g).tolist() for _, total in lengths]
    return Examples(ids, [p for p, _ in lengths])


def loaders(examples: Examples, args: argparse.Namespace, eos: int
            ) -> tuple[dict[str, tuple[DataLoader, int]], PackedDataset]:
    """The padded and the packed training loaders (seeded shuffles, drop_last) with their batch sizes, and the
    packing."""
    items = [instruction_item(x, p, args.mask_prompt, eos, args.max_length)
             for x, p in zip(examples.ids, examples.prompt_lens)]
    packed = PackedDataset(items, args.max_length)
    per_row = len(items) / len(packed)
    padded_batch = args.padded_batch or max(1, round(args.rows * per_row))
    common = {"drop_last": True, "num_workers": args.workers, "pin_memory": args.device == "cuda"}
    padded_loader = DataLoader(examples, batch_size=padded_batch,
                               sampler=ResumableSampler(len(examples), seed=args.seed),
                               collate_fn=InstructionCollate(eos, args.max_length, args.mask_prompt), **common)
    packed_loader = DataLoader(packed, batch_size=args.rows, sampler=ResumableSampler(len(packed), seed=args.seed),
                               collate_fn=PackedCollate(eos, args.max_length), **common)
    print(f"data: {len(items)} examples, {packed.summary()}")
    print(f"batches: padded {padded_batch} examples, packed {args.rows} rows (~{args.rows * per_row:.0f} examples)")
    return {"padded": (padded_loader, padded_batch), "packed": (packed_loader, args.rows)}, packed


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, loader: DataLoader, batch_size: int, args: argparse.Namespace, vocab: int, eos: int
                ) -> dict[str, Any]:
    """Train ``--warmup`` steps untimed, then an epoch (or ``--steps``) timed; the tokens/s and times."""
    torch.manual_seed(args.seed)
    config = GPTConfig.from_name(args.model, context_length=args.max_length, vocab_size=vocab, drop_rate=0.0,
                                 qkv_bias=True, tie_weights=True)
    task = InstructTask(model=config, speed={"compile": args.compile}, generate_after_fit=False)
    task.configure_model()
    task.to(args.device).train()
    if args.device == "cpu" and name == "packed":
        task.model.document_attention = "dense"  # FlexAttention has no backward pass on CPU
    if name == "packed-dense":
        task.model.document_attention = "dense"
    optimizer = build_adamw(parameter_groups(task, 0.1), 5e-5, (0.9, 0.999), 1e-8, fused=args.device == "cuda")
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")

    def step(batch: tuple[torch.Tensor, ...]) -> None:
        batch = tuple(t.to(args.device, non_blocking=True) for t in batch)
        with autocast:
            loss, _ = task._loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    batches = len(loader)
    it = iter(loader)
    for _ in range(min(args.warmup, batches)):
        step(next(it))
    timed = batches if args.steps == 0 else min(args.steps, batches)
    it = iter(loader) if args.steps == 0 else it
    if args.steps and args.warmup + timed > batches:  # not enough left in this epoch: start the next
        it = iter(loader)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    slots = real = trained = 0
    _sync(args.device)
    t0 = time.perf_counter()
    for _ in range(timed):
        batch = next(it)
        slots += batch[0].numel()
        real += int((batch[0] != eos).sum())
        trained += int((batch[1] != -100).sum())
        step(batch)
    _sync(args.device)
    seconds = time.perf_counter() - t0
    step_s = seconds / timed
    result = {
        "batch_size": batch_size, "unit": "rows" if name.startswith("packed") else "examples",
        "batches_per_epoch": batches, "timed_steps": timed, "epoch_measured": timed == batches,
        "step_ms": round(1e3 * step_s, 2), "epoch_s": round(step_s * batches, 3),
        "slot_tokens_per_s": round(slots / seconds), "example_tokens_per_s": round(real / seconds),
        "trained_tokens_per_s": round(trained / seconds), "slots_holding_tokens": round(real / max(slots, 1), 4),
        "mean_width": round(slots / timed / batch_size, 1),
    }
    if args.device == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(f"{name:>13}: {result['trained_tokens_per_s']:>12,} trained tok/s  {result['example_tokens_per_s']:>12,} "
          f"example tok/s  {result['slot_tokens_per_s']:>12,} slot tok/s  step {result['step_ms']} ms  epoch "
          f"{result['epoch_s']} s{'' if result['epoch_measured'] else ' (extrapolated)'}  "
          f"{result['slots_holding_tokens']:.1%} of slots hold tokens")
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--model", default="gpt2-124m", help="a GPTConfig preset (tiny for a CPU smoke test)")
    parser.add_argument("--lengths", default="builtin", help="builtin, or a JSON file of instruction records")
    parser.add_argument("--tokenizer", default="gpt2", help="with --lengths FILE: the tokenizer to count with")
    parser.add_argument("--examples", type=int, default=20_000, help="training examples in the epoch")
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per packed row (allowed_max_length)")
    parser.add_argument("--rows", type=int, default=8, help="packed rows per batch")
    parser.add_argument("--padded-batch", type=int, default=0,
                        help="examples per padded batch; 0: the packed batch's average number of examples")
    parser.add_argument("--mask-prompt", action="store_true", help="train on the responses only")
    parser.add_argument("--precision", default=None, choices=["bf16-mixed", "32-true"],
                        help="default: bf16-mixed on CUDA, 32-true on CPU")
    parser.add_argument("--compile", default=None, choices=["true", "false"], help="default: true on CUDA")
    parser.add_argument("--variants", default=None,
                        help="comma-separated: padded, packed, packed-dense (packed rows with the dense SDPA mask "
                             "instead of FlexAttention); default: all three on CUDA, padded and packed on CPU")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps; 0: one whole epoch")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--json", default=None, help="output file (default bench/results/packing-<device>-<date>.json)")
    args = parser.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    args.compile = (args.compile or ("true" if args.device == "cuda" else "false")) == "true"
    default_variants = "padded,packed,packed-dense" if args.device == "cuda" else "padded,packed"
    variants = (args.variants or default_variants).split(",")
    unknown = set(variants) - {"padded", "packed", "packed-dense"}
    if unknown:
        parser.error(f"unknown --variants {sorted(unknown)}")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    vocab = GPTConfig.from_name(args.model).vocab_size
    eos = EOS if vocab > EOS else vocab - 1
    if args.lengths == "builtin":
        lengths = builtin_lengths(args.examples, args.seed)
    else:
        lengths = file_lengths(args.lengths, args.tokenizer, args.examples, args.seed)
    examples = make_examples(lengths, eos, args.max_length, args.seed)
    made, packing = loaders(examples, args, eos)
    totals = sorted(min(t, args.max_length) for _, t in lengths)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    report: dict[str, Any] = {
        "bench": "packing", "date": datetime.date.today().isoformat(), "device": device_name,
        "torch": torch.__version__, "model": args.model, "precision": args.precision, "compile": args.compile,
        "command": "python bench/packing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": {"lengths": args.lengths, "examples": len(lengths), "mean_tokens": round(sum(totals) / len(totals), 1),
                 "p50": totals[len(totals) // 2], "p90": totals[int(0.9 * (len(totals) - 1))], "max": totals[-1],
                 "max_length": args.max_length, "mask_prompt": args.mask_prompt,
                 "packed_rows": len(packing), "packing_efficiency": round(packing.efficiency, 4)},
        "results": {},
    }
    for name in variants:
        loader, batch_size = made["packed" if name.startswith("packed") else "padded"]
        report["results"][name] = run_variant(name, loader, batch_size, args, vocab, eos)
    results = report["results"]
    if "padded" in results:
        base = results["padded"]
        report["vs_padded"] = {
            name: {"trained_tokens_per_s": round(r["trained_tokens_per_s"] / base["trained_tokens_per_s"], 3),
                   "epoch_time": round(r["epoch_s"] / base["epoch_s"], 3)}
            for name, r in results.items() if name != "padded"}
        for name, ratio in report["vs_padded"].items():
            print(f"{name} vs padded: {ratio['trained_tokens_per_s']}x trained tokens/s, epoch time x"
                  f"{ratio['epoch_time']}")
    out = Path(args.json) if args.json else ROOT / "bench" / "results" / (
        f"packing-{args.device}-{report['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
