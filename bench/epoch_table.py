"""Print per-epoch losses from a run's metrics.csv as a Markdown table.

    python bench/epoch_table.py checkpoints/verdict/logs/version_0/metrics.csv
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict


def main(path: str) -> None:
    rows = list(csv.DictReader(open(path, newline="")))
    by_epoch: dict[int, dict[str, float]] = defaultdict(dict)
    train_sum: dict[int, list[float]] = defaultdict(list)
    for row in rows:
        epoch = int(float(row["epoch"]))
        if row.get("train/loss"):
            train_sum[epoch].append(float(row["train/loss"]))
        for key in ("val/loss", "train_eval/loss", "train/tokens_seen"):
            if row.get(key):
                by_epoch[epoch][key] = float(row[key])
    print("| epoch | tokens seen | train loss (eval mode) | train loss (mean of steps, dropout on) | val loss |")
    print("|---|---|---|---|---|")
    for epoch in sorted(by_epoch):
        e = by_epoch[epoch]
        mean = sum(train_sum[epoch]) / len(train_sum[epoch]) if train_sum[epoch] else float("nan")
        print(f"| {epoch + 1} | {int(e.get('train/tokens_seen', 0)):,} | "
              f"{e.get('train_eval/loss', float('nan')):.3f} | {mean:.3f} | {e.get('val/loss', float('nan')):.3f} |")


if __name__ == "__main__":
    main(sys.argv[1])
