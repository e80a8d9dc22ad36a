"""``python -m lit_llm.clean SOURCE OUT_DIR``: the data-quality stage on its own (``lit-llm clean`` does the same).

    python -m lit_llm.clean corpus/ cleaned/ --num-proc 16
    python -m lit_llm.clean instruction-data.json cleaned/ --against eval.json --leakage-action remove
    python -m lit_llm.clean data.jsonl cleaned/ --settings quality.yaml   # the ``data.quality`` block of a config

SOURCE is anything ``data.source`` takes (files, directories, globs, ``builtin:``, ``hf:``; URLs with ``--sha256``);
it is read as a stream, so memory does not grow with the text. Writes ``OUT_DIR/data.jsonl`` (the records kept, all
their fields, in input order), ``OUT_DIR/report.json`` (counts and examples per rule, the settings) and, with
``--removed``, ``OUT_DIR/removed.jsonl`` (each removed record with its ``_rule`` and ``_index``). A short summary is
printed. Mistakes print one ``error: ...`` line and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lit_llm.cli import CommandParser, entry_point, run_command
from lit_llm.errors import ConfigError, DataError


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lit_llm.clean``."""
    p = CommandParser(prog="python -m lit_llm.clean",
                          description="Deduplicate, filter, redact and check for leakage; write the cleaned data "
                                      "and OUT_DIR/report.json.")
    p.add_argument("source", help="what data.source takes: a file, directory, glob, builtin:NAME, hf:NAME, URL")
    p.add_argument("out_dir", help="folder for data.jsonl and report.json (created)")
    p.add_argument("--fields", nargs="+", default=None,
                   help="the fields holding the text (default: text; or instruction input output; messages; "
                        "prompt chosen rejected: whichever the records have)")
    p.add_argument("--settings", default=None, help="a YAML/JSON file with data.quality settings")
    p.add_argument("--against", nargs="+", default=[], help="evaluation sources to check leakage against")
    p.add_argument("--leakage-action", choices=["report", "remove"], default=None)
    p.add_argument("--leakage-n", type=int, default=None, help="words per leakage n-gram (default 13)")
    p.add_argument("--threshold", type=float, default=None, help="near-duplicate Jaccard threshold (default 0.8)")
    p.add_argument("--shingle-size", type=int, default=None, help="words per shingle (default 5)")
    p.add_argument("--num-perm", type=int, default=None, help="MinHash permutations (default 128)")
    p.add_argument("--seed", type=int, default=None, help="MinHash seed (default 1)")
    p.add_argument("--no-exact", action="store_true", help="keep exact duplicates")
    p.add_argument("--no-near", action="store_true", help="keep near-duplicates")
    p.add_argument("--no-filters", action="store_true", help="skip the heuristic filters")
    p.add_argument("--redact", action="store_true", help="replace e-mail addresses, phone numbers and IPs")
    p.add_argument("--num-proc", type=int, default=None, help="worker processes (default: 1)")
    p.add_argument("--removed", action="store_true", help="also write removed.jsonl")
    p.add_argument("--sha256", default=None, help="SHA-256 of a URL source")
    p.add_argument("--file-format", default=None, choices=["text", "json", "jsonl", "csv", "tsv", "parquet"])
    p.add_argument("--hf-split", default="train", help="split of an hf: source")
    return p


def _settings(args: argparse.Namespace) -> Any:
    from lit_llm.data.quality import QualityConfig

    values: dict[str, Any] = {}
    if args.settings:
        path = Path(args.settings)
        if not path.is_file():
            raise ConfigError(f"--settings {args.settings}: no such file (cwd: {Path.cwd()})")
        import yaml

        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--settings {args.settings} is not valid YAML/JSON: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"--settings {args.settings} must hold a mapping of data.quality settings")
        values = loaded.get("quality", loaded)  # the file may hold the block itself or {quality: {...}}
    config = QualityConfig.from_dict(values)
    overrides = {
        ("near", "threshold"): args.threshold, ("near", "shingle_size"): args.shingle_size,
        ("near", "num_perm"): args.num_perm, ("near", "seed"): args.seed, ("leakage", "n"): args.leakage_n,
        ("leakage", "action"): args.leakage_action,
    }
    for (part, name), value in overrides.items():
        if value is not None:
            setattr(getattr(config, part), name, value)
    if args.against:
        config.leakage.against = [*config.leakage.against, *args.against]
    if args.no_exact:
        config.exact = False
    if args.no_near:
        config.near.enabled = False
    if args.no_filters:
        config.filters.enabled = False
    if args.redact:
        config.redact.enabled = True
    if args.num_proc is not None:
        config.num_proc = args.num_proc
    config.check("quality")
    return config


def _jsonable(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Clean ``args.source`` into ``args.out_dir``; returns the report as a dict."""
    from lit_llm.data.quality import Cleaner, guess_fields, write_report
    from lit_llm.data.sources import load_records

    config = _settings(args)
    records = load_records(args.source, sha256=args.sha256, hf_split=args.hf_split, streaming=True, key="SOURCE",
                           file_format=args.file_format)
    stream = iter(records)
    try:
        first = next(stream)
    except StopIteration:
        raise DataError(f"SOURCE {args.source} holds no records; nothing to clean") from None
    text_fields = args.fields or guess_fields(list(first), key="--fields")
    missing = [f for f in text_fields if f not in first]
    if missing:
        raise DataError(f"--fields {missing} not in the records of {args.source} (fields: {sorted(first)}); "
                        "name the fields that hold the text")
    against = {}
    for i, spec in enumerate(config.leakage.against if config.leakage.enabled else []):
        against[spec] = load_records(spec, key=f"--against[{i}]").to_list()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cleaner = Cleaner(config, text_fields, against=against, name=str(args.source))
    removed_file = open(out / "removed.jsonl", "w", encoding="utf-8") if args.removed else None

    def on_removed(index: int, record: dict[str, Any], rule: str) -> None:
        if removed_file is not None:
            removed_file.write(_jsonable({**record, "_rule": rule, "_index": index}) + "\n")

    def everything() -> Iterable[dict[str, Any]]:
        yield first
        yield from stream

    tmp = out / f"data.jsonl.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for _, record in cleaner.run(everything(), on_removed=on_removed):
                f.write(_jsonable(record) + "\n")
    finally:
        if removed_file is not None:
            removed_file.close()
    os.replace(tmp, out / "data.jsonl")
    write_report(cleaner.report, out / "report.json")
    print(cleaner.report.summary())
    print(f"wrote {out / 'data.jsonl'} and {out / 'report.json'}")
    return cleaner.report.to_dict()


def main(argv: Iterable[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return run_command(lambda: run(build_parser().parse_args(None if argv is None else list(argv))))


if __name__ == "__main__":
    entry_point(main)
