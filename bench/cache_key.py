"""What keying caches by content costs at the start of a run: the xxHash-128 of a corpus file (the digest every cache
built from local files is keyed by), alone and with the UTF-8 check that text files get in the same pass, and a start
that finds the file's digest recorded. Prints one JSON object (docs/data.md) and writes it under bench/results/:

    python bench/cache_key.py                 # a 1 GiB text file in a temporary folder
    python bench/cache_key.py --gib 4 --dir /data/scratch

The file is read from the page cache after a first warm-up read (the figures measure hashing, not the disk); a cold
read from disk adds the disk's own time (e.g. ~0.5 s/GB at 2 GB/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the test file in GiB")
    parser.add_argument("--dir", default=None, help="folder for the test file (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from lit_llm.data import cache

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "corpus.txt"
        line = ("The quick brown fox jumps over the lazy dog; naïve café, déjà vu — 42.\n" * 64).encode("utf-8")
        size = int(args.gib * (1 << 30))
        with open(path, "wb") as f:
            for _ in range(size // len(line)):
                f.write(line)
        size = path.stat().st_size
        old = time.time() - 10  # a file last changed 10 s ago, so that its digest may be recorded
        os.utime(path, (old, old))
        cache._hash_file(path, "bench", False)  # warm the page cache
        hash_only = _best(lambda: cache._hash_file(path, "bench", False), args.repeats)
        with_utf8 = _best(lambda: cache._hash_file(path, "bench", True), args.repeats)
        records = Path(folder) / "content"
        first = _best(lambda: cache.file_digest(path, record_dir=None, utf8=True), 1)
        cache.file_digest(path, record_dir=records, utf8=True)
        recorded = _best(lambda: cache.file_digest(path, record_dir=records, utf8=True), args.repeats)
        import xxhash

        result = {
            "benchmark": "cache_key",
            "command": "python bench/cache_key.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'unknown'})",
            "python": platform.python_version(),
            "xxhash": xxhash.VERSION,
            "file_bytes": size,
            "xxh3_128_s": round(hash_only, 3),
            "xxh3_128_gb_per_s": round(size / hash_only / 1e9, 2),
            "xxh3_128_with_utf8_check_s": round(with_utf8, 3),
            "xxh3_128_with_utf8_check_gb_per_s": round(size / with_utf8 / 1e9, 2),
            "first_start_s": round(first, 3),
            "start_with_recorded_digest_s": round(recorded, 5),
        }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / f"cache-key-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
