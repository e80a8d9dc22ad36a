"""Throughput of the data-quality stage (``python -m lit_llm.clean``) on a large synthetic corpus.

    python bench/quality.py --size-mb 1024 --procs 2 16        # the figures in docs/benchmarks.md (16+ cores)
    python bench/quality.py --size-mb 200 --procs 2             # a smaller run

Generates (once, streaming to disk, seeded) a JSON Lines corpus of ``--size-mb`` MB: documents of 60-1,200 words
from a 50,000-word vocabulary with Zipf-like frequencies, 10 % of them exact duplicates after normalisation, 10 %
near-duplicates (2 % of words edited) and 2 % junk. Then, for each ``--procs`` value, runs the whole stage with the
default settings as the command does (a streamed read of the file, every rule, ``data.jsonl`` and ``report.json``
written) in a fresh process, and records MB/s of input, the wall time, the peak resident memory of the main process
and of the largest worker, and the report's counts. One JSON file per invocation goes to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate(path: Path, size_mb: int, seed: int = 0) -> int:
    """Write the corpus (if it is not there at this size) and return its size in bytes."""
    target = size_mb * 1_000_000
    if path.is_file() and path.stat().st_size >= target:
        return path.stat().st_size
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(50_000)]
    weights = [1 / (i + 10) for i in range(len(vocab))]
    recent: list[str] = []
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            r = rng.random()
            if r < 0.10 and recent:
                text = rng.choice(recent).upper()
            elif r < 0.20 and recent:
                words = rng.choice(recent).split()
                for _ in range(max(1, len(words) // 50)):
                    words[rng.randrange(len(words))] = rng.choice(vocab)
                text = " ".join(words)
            elif r < 0.22:
                text = " ".join(str(rng.randint(0, 99999)) for _ in range(200))
            else:
                n = rng.randint(60, 1200)
                words = rng.choices(vocab, weights=weights, k=n)
                text = "\n\n".join(" ".join(words[i : i + 80]) + "." for i in range(0, n, 80))
                recent.append(text)
                if len(recent) > 2000:
                    recent.pop(rng.randrange(len(recent)))
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
    os.replace(tmp, path)
    return path.stat().st_size


def run_one(corpus: Path, procs: int, out_dir: Path) -> dict:
    """One cleaning run in a fresh process; its wall time and peak memory."""
    code = (
        "import json, resource, sys, time\n"
        "from lit_llm.clean import build_parser, run\n"
        "args = build_parser().parse_args(sys.argv[1:])\n"
        "t = time.perf_counter(); report = run(args); wall = time.perf_counter() - t\n"
        "peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print('RESULT ' + json.dumps({'wall_s': wall, 'peak_rss_main_mb': peak_self / 1024,"
        " 'peak_rss_largest_worker_mb': peak_children / 1024, 'report': report}))\n"
    )
    cmd = [sys.executable, "-c", code, str(corpus), str(out_dir), "--num-proc", str(procs)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{result.stderr[-3000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="corpus size in MB (1 MB = 10**6 bytes)")
    parser.add_argument("--procs", type=int, nargs="+", default=[2, 16], help="worker processes, one run each")
    parser.add_argument("--work-dir", default="/tmp/lit_llm_bench_quality", help="where the corpus and outputs go")
    parser.add_argument("--out", default=None, help="result JSON (default bench/results/quality-<host>-<date>.json)")
    args = parser.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{args.size_mb}mb.jsonl"
    t = time.perf_counter()
    size = generate(corpus, args.size_mb)
    print(f"corpus {corpus}: {size / 1e6:.0f} MB ({time.perf_counter() - t:.0f} s to generate or find)", flush=True)
    runs = []
    for procs in args.procs:
        load = os.getloadavg()[0]  # other work on the machine shows here: the figures are only as good as it is low
        result = run_one(corpus, procs, work / f"out-{procs}")
        report = result.pop("report")
        row = {"procs": procs, "mb_per_s": size / 1e6 / result["wall_s"], "load_average_before": load, **result,
               "records_in": report["records_in"], "records_out": report["records_out"], "removed": report["removed"]}
        runs.append(row)
        print(json.dumps(row), flush=True)
    record = {
        "bench": "quality", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "corpus_bytes": size, "command": " ".join(sys.argv), "runs": runs,
        "generator_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"quality-{platform.node()}-{datetime.now(timezone.utc):%Y%m%d-%H%M}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2), encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
