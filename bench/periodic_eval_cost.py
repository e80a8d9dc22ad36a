"""What ``PeriodicEval`` costs a training run: the quickstart (``configs/pretrain/quickstart.yaml``) with the callback
at its defaults (every 500 steps, 100 questions, 2 % budget) scoring a multiple-choice cloze built from the
quickstart's own corpus. Prints one JSON object (docs/evaluation.md) and writes it under bench/results/:

    python bench/periodic_eval_cost.py                       # the quickstart as configured (CPU, 600 steps)
    python bench/periodic_eval_cost.py --max-steps 100 --every-n-steps 50   # a quick check

The questions: a passage of the built-in ``pydoc`` corpus cut after 12 words, the next 6 words as the right ending and
the endings of three other passages as the wrong ones. The cost is the seconds spent evaluating over the wall time of
``trainer.fit`` less those seconds (the training time the budget is measured against).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cloze_questions(n: int, seed: int = 0) -> list[dict]:
    """``n`` four-way questions from the built-in pydoc corpus."""
    from lit_llm.data.builtin import load_builtin

    words = " ".join(load_builtin("pydoc")["text"]).split()
    rng = random.Random(seed)
    starts = rng.sample(range(0, len(words) - 18, 18), n + 3)
    passages = [(" ".join(words[s : s + 12]), " " + " ".join(words[s + 12 : s + 18])) for s in starts]
    out = []
    for i in range(n):
        context, right = passages[i]
        wrong = [passages[j][1] for j in rng.sample([k for k in range(len(passages)) if k != i], 3)]
        answer = rng.randrange(4)
        choices = wrong[:answer] + [right] + wrong[answer:]
        out.append({"context": context, "choices": choices, "answer": answer})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=None, help="default: the config's (600)")
    parser.add_argument("--every-n-steps", type=int, default=500)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--max-overhead", type=float, default=0.02)
    parser.add_argument("--out", default=None, help="default: bench/results/periodic-eval-cost-<date>.json")
    args = parser.parse_args()

    from lit_llm.callbacks import PeriodicEval
    from lit_llm.train import cli

    work = Path(tempfile.mkdtemp(prefix="periodic_eval_"))
    questions = work / "pydoc_cloze.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in cloze_questions(args.limit)), encoding="utf-8")
    overrides = ["--trainer.default_root_dir", str(work / "run"), "--trainer.enable_progress_bar", "false"]
    if args.max_steps is not None:
        overrides += ["--trainer.max_steps", str(args.max_steps)]
    run = cli(["--config", str(ROOT / "configs/pretrain/quickstart.yaml"), *overrides], run=False)
    callback = PeriodicEval(multiple_choice=str(questions), every_n_steps=args.every_n_steps, limit=args.limit,
                            max_overhead=args.max_overhead)
    run.trainer.callbacks.append(callback)
    start = time.perf_counter()
    run.trainer.fit(run.model, datamodule=run.datamodule)
    wall = time.perf_counter() - start
    spent = callback.throughput_excluded_seconds
    result = {
        "command": "python bench/periodic_eval_cost.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        "date": time.strftime("%Y-%m-%d"),
        "device": f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "steps": run.trainer.global_step,
        "fit_seconds": round(wall, 2),
        "eval_seconds": round(spent, 3),
        "evaluations": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()}
                        for h in callback.history],
        "cost_fraction_of_training": round(spent / (wall - spent), 5),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"periodic-eval-cost-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
