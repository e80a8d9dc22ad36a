"""Evaluation throughput: lit_llm's lm-evaluation-harness adapter against the harness's Hugging Face backend, on the
same weights (a lit_llm checkpoint and its ``to-hf`` export), the same local tasks, in the same run.

One invocation measures everything for docs/benchmarks.md and writes one JSON file under bench/results/:

    python bench/evaluate.py                                   # random GPT-2 124M shape, CUDA, fp32 and bf16
    python bench/evaluate.py --checkpoint checkpoints/run/last.ckpt
    python bench/evaluate.py --preset tiny --device cpu --questions 20 --texts 4 --dtypes float32   # a CPU check

The tasks are written by the script from the built-in ``pydoc`` corpus (no download): a four-way multiple-choice
cloze (``loglikelihood`` requests; a passage cut after 24 words, its next 8 words or those of three other passages)
and a perplexity task over longer passages (``loglikelihood_rolling``, windows of the context length). For each dtype
and backend: one warm-up pass over a few documents, then the timed ``lm_eval.evaluator.evaluate`` per task (model
loading and the harness's environment report left out). Requests/s counts the harness's requests; tokens/s counts
the tokens of every request's text (context and continuation, or the whole text), by the lit_llm tokenizer. The two
backends' scores are reported side by side as a check that they did the same work.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def pydoc_words() -> list[str]:
    from lit_llm.data.builtin import load_builtin

    return " ".join(load_builtin("pydoc")["text"]).split()


def write_tasks(folder: Path, words: list[str], questions: int, texts: int, text_words: int, seed: int = 0) -> None:
    """``bench_mc`` (four-way cloze) and ``bench_ppl`` (rolling log-likelihood) as harness task YAML + JSON Lines."""
    rng = random.Random(seed)
    span = 32
    starts = rng.sample(range(0, len(words) - span, span), questions + 3)
    passages = [(" ".join(words[s : s + 24]), " ".join(words[s + 24 : s + span])) for s in starts]
    rows = []
    for i in range(questions):
        context, right = passages[i]
        wrong = [passages[j][1] for j in rng.sample([k for k in range(len(passages)) if k != i], 3)]
        answer = rng.randrange(4)
        rows.append({"context": context, "choices": wrong[:answer] + [right] + wrong[answer:], "answer": answer})
    docs = [{"text": " ".join(words[s : s + text_words])}
            for s in rng.sample(range(0, len(words) - text_words, text_words), texts)]
    for name, data, body in (
        ("bench_mc", rows, ["output_type: multiple_choice", 'doc_to_text: "{{context}}"',
                            'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{answer}}"', "metric_list:",
                            "  - metric: acc", "  - metric: acc_norm"]),
        ("bench_ppl", docs, ["output_type: loglikelihood_rolling", 'doc_to_text: ""', 'doc_to_target: "{{text}}"',
                             "metric_list:", "  - metric: word_perplexity", "  - metric: bits_per_byte"]),
    ):
        file = folder / f"{name}.jsonl"
        file.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
        header = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:", f"    test: {file}",
                  "test_split: test"]
        (folder / f"{name}.yaml").write_text("\n".join(header + body) + "\n", encoding="utf-8")


def make_weights(args: argparse.Namespace, work: Path) -> tuple[str, Path, Any]:
    """(lit_llm source, its to-hf export, tokenizer): the given checkpoint, or a random model of ``--preset``."""
    from lit_llm.weights.export import export_hf
    from lit_llm.weights.readers import load_model_for_inference

    if args.checkpoint:
        _, tokenizer, _ = load_model_for_inference(args.checkpoint)
        return args.checkpoint, export_hf(args.checkpoint, work / "hf"), tokenizer
    from lit_llm.data.builtin import load_builtin
    from lit_llm.data.tokenizer import train_bpe
    from lit_llm.model.config import GPTConfig
    from lit_llm.model.gpt import GPTModel
    from lit_llm.weights.export import save_weights

    tokenizer = train_bpe(load_builtin("pydoc")["text"], vocab_size=args.tokenizer_vocab)
    torch.manual_seed(0)
    config = GPTConfig.from_name(args.preset, qkv_bias=True, tie_weights=True, drop_rate=0.0, pad_vocab_multiple=1)
    model = GPTModel(config.replace(vocab_size=max(config.vocab_size, tokenizer.vocab_size))).eval()
    save_weights(model.config, model.state_dict(), work / "lit", tokenizer)
    return str(work / "lit"), export_hf(model, work / "hf", tokenizer), tokenizer


class Recorder:
    """Wraps an LM's request methods to keep the requests' texts (counted after the timing)."""

    def __init__(self, lm: Any) -> None:
        self.texts: list[str] = []
        for name in ("loglikelihood", "loglikelihood_rolling"):
            original = getattr(lm, name)

            def call(requests: list, *a: Any, _original: Any = original, **kw: Any) -> Any:
                self.texts.extend("".join(r.args) for r in requests)  # (context, continuation) or (text,)
                return _original(requests, *a, **kw)

            setattr(lm, name, call)


def run_tasks(lm: Any, manager: Any, task: str, limit: int | None, device: torch.device) -> tuple[dict, float, list]:
    from lm_eval.evaluator import evaluate

    if hasattr(manager, "load"):  # lm-eval >= 0.4.10
        tasks = manager.load([task])
    else:
        from lm_eval.tasks import get_task_dict

        tasks = get_task_dict([task], manager)
    recorder = Recorder(lm)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    results = evaluate(lm=lm, task_dict=tasks, limit=limit, bootstrap_iters=0, log_samples=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    for name in ("loglikelihood", "loglikelihood_rolling"):
        vars(lm).pop(name, None)  # back to the class's methods
    return results, seconds, recorder.texts


def build_lm(backend: str, source: str, export: Path, dtype: str, device: torch.device, batch_size: int) -> Any:
    from lm_eval.api.registry import get_model

    import lit_llm.evaluation  # noqa: F401  (registers "lit_llm")

    if backend == "hf":
        return get_model("hf")(pretrained=str(export), dtype=dtype, device=str(device), batch_size=batch_size,
                               trust_remote_code=False)
    return get_model("lit_llm")(checkpoint=source, dtype=dtype, device=str(device), batch_size=batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="a lit_llm checkpoint (default: a random --preset model)")
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--tokenizer-vocab", type=int, default=8192, help="BPE trained on pydoc for a random model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--questions", type=int, default=2000, help="multiple-choice questions (x4 requests)")
    parser.add_argument("--texts", type=int, default=200, help="perplexity documents")
    parser.add_argument("--text-words", type=int, default=1500, help="words per perplexity document")
    parser.add_argument("--out", default=None, help="default: bench/results/evaluate-<device>-<date>.json")
    args = parser.parse_args()

    import lm_eval

    from lit_llm.evaluation import build_task_manager

    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    source, export, tokenizer = make_weights(args, work)
    write_tasks(work, pydoc_words(), args.questions, args.texts, args.text_words)
    manager = build_task_manager(work, include_defaults=False)
    runs = []
    for dtype in args.dtypes.split(","):
        for backend in ("lit_llm", "hf"):
            lm = build_lm(backend, source, export, dtype, device, args.batch_size)
            for task in ("bench_mc", "bench_ppl"):
                run_tasks(lm, manager, task, 8, device)  # warm-up: kernels, allocator, dataset cache
                results, seconds, texts = run_tasks(lm, manager, task, None, device)
                tokens = sum(len(tokenizer.encode(t)) for t in texts)
                metrics = {k: v for k, v in results["results"][task].items() if k != "alias" and "stderr" not in k}
                runs.append({"backend": backend, "dtype": dtype, "task": task, "requests": len(texts),
                             "tokens": tokens, "seconds": round(seconds, 3),
                             "requests_per_sec": round(len(texts) / seconds, 1),
                             "tokens_per_sec": round(tokens / seconds), "scores": metrics})
                print(json.dumps(runs[-1]), flush=True)
            del lm
            if device.type == "cuda":
                torch.cuda.empty_cache()
    speedups = {}
    for r in runs:
        if r["backend"] == "lit_llm":
            hf = next(x for x in runs if x["backend"] == "hf" and x["dtype"] == r["dtype"] and x["task"] == r["task"])
            speedups[f"{r['task']}/{r['dtype']}"] = round(r["tokens_per_sec"] / hf["tokens_per_sec"], 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    record = {
        "command": "python bench/evaluate.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "date": time.strftime("%Y-%m-%d"), "device": name, "torch": torch.__version__,
        "lm_eval": getattr(lm_eval, "__version__", "?"), "transformers": __import__("transformers").__version__,
        "weights": args.checkpoint or f"random {args.preset} (tied, qkv bias), BPE {tokenizer.vocab_size} on pydoc",
        "batch_size": args.batch_size, "runs": runs, "lit_llm_over_hf_tokens_per_sec": speedups,
    }
    print(json.dumps(record["lit_llm_over_hf_tokens_per_sec"], indent=2))
    slug = "cuda" if device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"evaluate-{slug}-{record['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
