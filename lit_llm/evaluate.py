"""``python -m lit_llm.evaluate``: score a checkpoint on standard benchmarks with EleutherAI's lm-evaluation-harness.

    python -m lit_llm.evaluate --checkpoint checkpoints/quickstart/last.ckpt --tasks hellaswag,arc_easy,piqa
    python -m lit_llm.evaluate --checkpoint openai-community/gpt2 --tasks lambada_openai,wikitext --batch_size 32
    python -m lit_llm.evaluate --checkpoint out/run --tasks my_task --include_path my_tasks/ --limit 100
    python -m lit_llm.evaluate --list_tasks --include_path my_tasks/

``--checkpoint`` is anything lit_llm reads (a ``.ckpt`` or run directory of a pretraining, instruction or LoRA run,
a consolidated file of a sharded run, a converted or Hugging Face GPT-2 directory, a Hub id); the model is scored as
it is, without exporting it, through :class:`lit_llm.evaluation.LitLLMEvalModel`. ``--tasks`` names the harness's
tasks, groups or tags (comma-separated); ``--include_path`` adds a folder of task YAML files in the harness's own
format, which work offline over local data files. The harness's standard tasks download their datasets from the
Hugging Face Hub on first use (then they are cached).

The results print as a table and are written as JSON (``results-<time>.json``) to ``--out_dir``, by default the
``eval/`` folder of the checkpoint's run directory. Needs the extra: ``pip install 'lit_llm[eval]'``.

Mistakes print one ``error: ...`` line and exit with status 1; ``LIT_LLM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from lit_llm.cli import CommandParser, entry_point, run_command
from lit_llm.errors import ConfigError, LitLLMError


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m lit_llm.evaluate`` (``--a_b`` and ``--a-b`` both work)."""
    p = CommandParser(
        prog="python -m lit_llm.evaluate",
        description="Score a lit_llm checkpoint on lm-evaluation-harness tasks (pip install 'lit_llm[eval]').",
    )
    p.add_argument("--checkpoint", metavar="SOURCE",
                   help="lit_llm .ckpt or run directory, converted/Hugging Face GPT-2 directory, or Hub id")
    p.add_argument("--tasks", metavar="T1,T2",
                   help="harness tasks, groups or tags, comma-separated (hellaswag,arc_easy,piqa,lambada_openai,...)")
    p.add_argument("--include_path", "--include-path", action="append", default=None, metavar="DIR",
                   help="a folder of task YAML files in the harness's format (repeatable)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=16, metavar="N",
                   help="sequences per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights' dtype; auto keeps the checkpoint's")
    p.add_argument("--limit", type=float, default=None, metavar="N",
                   help="score only the first N documents of each task (a fraction when below 1); for quick checks")
    p.add_argument("--num_fewshot", "--num-fewshot", type=int, default=None, metavar="K",
                   help="examples put before each question (default: each task's own setting)")
    p.add_argument("--max_gen_toks", "--max-gen-toks", type=int, default=256, metavar="N",
                   help="most tokens generated per answer when a generative task does not say (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the harness's few-shot sampling and of Python, NumPy "
                   "and torch (default: %(default)s)")
    p.add_argument("--out_dir", "--out-dir", default=None, metavar="DIR",
                   help="where results-<time>.json goes (default: the checkpoint's run directory's eval/)")
    p.add_argument("--log_samples", "--log-samples", action="store_true",
                   help="also write every document's requests and responses (samples-<task>-<time>.jsonl)")
    p.add_argument("--list_tasks", "--list-tasks", action="store_true",
                   help="print the task names the harness knows (with --include_path's) and exit")
    return p


def default_out_dir(checkpoint: str) -> Path:
    """``eval/`` in the checkpoint's run directory (the folder of a file, the directory itself), else ``./eval/<id>``
    for a Hub id."""
    path = Path(checkpoint).expanduser()
    if path.is_file():
        return path.parent / "eval"
    if path.is_dir():
        return path / "eval"
    return Path("eval") / checkpoint.replace("/", "__")


def task_manager_for(names: list[str], include_path: list[str] | None) -> Any:
    """The harness's task index: of ``include_path`` alone when it holds every named task (indexing the harness's
    thousands of own tasks takes seconds), else of both."""
    from lit_llm.evaluation import build_task_manager

    if include_path:
        local = build_task_manager(include_path, include_defaults=False)
        wanted = [n.strip() for n in names if n.strip()]
        if wanted and all(n in local.all_tasks for n in wanted):
            return local
    return build_task_manager(include_path)


def _limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    if value <= 0:
        raise ConfigError(f"--limit {value:g} must be > 0 (a count, or a fraction below 1)")
    return int(value) if value >= 1 and value == int(value) else value


def run(args: argparse.Namespace, stdout: TextIO) -> dict[str, Any] | None:
    """Carry out parsed command-line arguments; returns the harness's results (``None`` for ``--list_tasks``)."""
    from lit_llm.evaluation import build_task_manager  # needs the extra; its error says how to install it

    if args.list_tasks:
        manager = build_task_manager(args.include_path)
        stdout.write("\n".join(sorted(manager.all_tasks)) + "\n")
        return None
    problems = []
    if not args.checkpoint:
        problems.append("--checkpoint is required (a lit_llm .ckpt or run directory, a GPT-2 directory or Hub id)")
    if not args.tasks:
        problems.append("--tasks is required (comma-separated task names; --list_tasks shows them)")
    if args.batch_size < 1:
        problems.append(f"--batch_size {args.batch_size} must be >= 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        problems.append(f"--num_fewshot {args.num_fewshot} must be >= 0")
    if args.max_gen_toks < 1:
        problems.append(f"--max_gen_toks {args.max_gen_toks} must be >= 1")
    if problems:
        raise ConfigError("Invalid arguments:\n  - " + "\n  - ".join(problems))
    limit = _limit(args.limit)
    import lm_eval

    from lit_llm.evaluation import LitLLMEvalModel, check_tasks, harness_version, results_table

    manager = task_manager_for(args.tasks.split(","), args.include_path)
    tasks = check_tasks(args.tasks.split(","), manager)  # before the weights load: a typo costs nothing
    out_dir = Path(args.out_dir).expanduser() if args.out_dir else default_out_dir(args.checkpoint)
    lm = LitLLMEvalModel(checkpoint=args.checkpoint, batch_size=args.batch_size, device=args.device,
                         dtype=None if args.dtype == "auto" else args.dtype, max_gen_toks=args.max_gen_toks)
    start = time.perf_counter()
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit, task_manager=manager,
            log_samples=args.log_samples, random_seed=args.seed, numpy_random_seed=args.seed,
            torch_random_seed=args.seed, fewshot_random_seed=args.seed,
        )
    except ConnectionError as err:  # the Hub's offline and network errors are ConnectionErrors
        raise ConfigError(
            f"a task's dataset could not be downloaded ({type(err).__name__}: {err}). The harness's standard tasks "
            "fetch their data from the Hugging Face Hub on first use: run once with network access (the data is "
            "cached), or use tasks over local files (--include_path)"
        ) from err
    seconds = time.perf_counter() - start
    results["lit_llm"] = {"checkpoint": args.checkpoint, "device": str(lm.device), "dtype": str(lm.model.tok_emb.weight
                          .dtype).removeprefix("torch."), "batch_size": args.batch_size, "seconds": round(seconds, 3),
                          "lm_eval_version": harness_version()}
    samples = results.pop("samples", None)
    stdout.write(results_table(results) + "\n")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"results-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=_jsonable, ensure_ascii=False) + "\n", encoding="utf-8")
    if samples:
        for task, docs in samples.items():
            with (out_dir / f"samples-{task}-{stamp}.jsonl").open("w", encoding="utf-8") as f:
                for doc in docs:
                    f.write(json.dumps(doc, default=_jsonable, ensure_ascii=False) + "\n")
    stdout.write(f"results: {path} ({seconds:.1f} s)\n")
    stdout.flush()
    return results


def _jsonable(value: Any) -> Any:
    """What ``json`` cannot write: NumPy numbers and arrays, sets, everything else as its ``str``."""
    for attr in ("item", "tolist"):
        if hasattr(value, attr):
            try:
                return getattr(value, attr)()
            except (TypeError, ValueError):
                pass
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def main(argv: Iterable[str] | None = None, stdout: TextIO | None = None) -> int:
    """Run ``python -m lit_llm.evaluate`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    User mistakes print ``error: <message>`` on stderr and return 1 (``LIT_LLM_DEBUG=1`` re-raises them).
    """
    def action() -> None:
        run(build_parser().parse_args(None if argv is None else list(argv)), stdout or sys.stdout)

    return run_command(action, (LitLLMError, ValueError, OSError))


if __name__ == "__main__":
    entry_point(main)
