"""Fuzzing ``lit_llm.data.sources.load_records`` with arbitrary file contents: every input either loads or raises a
lit_llm ``DataError`` / ``ConfigError`` (one clear message), never another exception."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import datasets
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from mutations import FAST_EXAMPLES, SLOW_EXAMPLES, mutate, run_fuzz  # noqa: E402

from lit_llm.data.sources import load_records  # noqa: E402
from lit_llm.errors import ConfigError, DataError  # noqa: E402

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# JSON values: scalars of every kind (big ints, floats incl. inf/nan as Python's json writes them, odd strings), and
# nested lists / objects.
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
records = st.dictionaries(st.sampled_from(["text", "label", "a", "", "text "]), values, max_size=3)
junk = st.one_of(st.text(max_size=60), st.binary(max_size=60).map(lambda b: b.decode("latin-1")))

json_files = st.one_of(values.map(json.dumps), st.lists(records, max_size=4).map(json.dumps),
                       st.dictionaries(st.sampled_from(["data", "text", "rows"]), st.lists(values, max_size=3),
                                       max_size=2).map(json.dumps), junk)
jsonl_files = st.one_of(st.lists(st.one_of(records.map(json.dumps), values.map(json.dumps), junk), max_size=5)
                        .map("\n".join), junk)
csv_cells = st.text(alphabet=st.sampled_from(list('ab ,;"\'\n\r\t1.-é\x00\\')), max_size=12)
csv_files = st.one_of(st.lists(st.lists(csv_cells, min_size=1, max_size=4), max_size=5)
                      .map(lambda rows: "\n".join(",".join(row) for row in rows)), junk)


def crashes_pyarrow(content: str | bytes) -> bool:
    """pyarrow's JSON reader (26.0) segfaults when a file's first JSON value is ``null``: the process dies, which no
    ``except`` can turn into a DataError. Such inputs are left to ``test_leading_null_json_is_a_data_error``."""
    text = content.decode("latin-1") if isinstance(content, bytes) else content
    return text.lstrip(" \t\r\n").startswith("null")


def check(suffix: str, content: str | bytes) -> None:
    if suffix in (".json", ".jsonl"):
        assume(not crashes_pyarrow(content))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8", errors="surrogatepass")
        else:
            path.write_bytes(content)
        try:
            ds = load_records(str(path), cache_dir=Path(tmp) / "cache")
        except (DataError, ConfigError) as err:
            message = str(err)
            assert message and "data.source" in message, message  # names the key it is about
        else:
            assert isinstance(ds, datasets.Dataset) and len(ds) > 0


@FUZZ
@given(json_files)
def test_json_contents(content):
    check(".json", content)


@FUZZ
@given(jsonl_files)
def test_jsonl_contents(content):
    check(".jsonl", content)


@FUZZ
@given(csv_files)
def test_csv_contents(content):
    check(".csv", content)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from([".json", ".jsonl", ".csv", ".tsv"]))
def test_arbitrary_bytes(content, suffix):
    check(suffix, content)


LOAD_EACH = """
import sys
from lit_llm.data.sources import load_records
from lit_llm.errors import DataError
for path in sys.argv[2:]:
    try:
        load_records(path, cache_dir=sys.argv[1])
    except DataError as err:
        print("DataError:", err, flush=True)
"""


def test_leading_null_json_is_a_data_error(tmp_path):
    """In a subprocess, since the crash takes the whole process down (exit status -11): a JSON file holding ``null``
    and a JSON Lines file whose first line is `` null``."""
    files = {"top.json": "null", "first_line.jsonl": ' null\n{"text": "a"}\n'}
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    args = [sys.executable, "-c", LOAD_EACH, str(tmp_path / "cache"), *(str(tmp_path / name) for name in files)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 2 and all(line.startswith("DataError: data.source") for line in lines), lines


# ---- damaged copies of valid files --------------------------------------------------------------------------------
# Each valid file below is mutated (bit flips, truncation, insertion, deletion, overwrites, splices: see mutations.py)
# and read through `load_records`: FAST_EXAMPLES files per format in the default suite, SLOW_EXAMPLES in the `slow`
# variant. A `.tar.gz` is not a supported source (only zip archives are extracted): every one is a DataError.


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


_RECORDS = b'{"text": "hello there", "label": 1}\n{"text": "caf\\u00e9 world", "label": 0}\n'
VALID_FILES = {
    ".json": json.dumps([{"text": "hello there", "label": 1}, {"text": "caf\u00e9 world", "label": 0}]).encode(),
    ".jsonl": _RECORDS,
    ".csv": "text,label\nhello there,1\n\"caf\u00e9, world\",0\n".encode(),
    ".txt": "Some text, caf\u00e9.\n\nMore text.\n".encode(),
    ".zip": _zip({"data/records.jsonl": _RECORDS * 5}),
    ".tar.gz": _tar_gz({"records.jsonl": _RECORDS}),
}


def check_mutated(suffix: str, ops: list[tuple]) -> None:
    data = mutate(VALID_FILES[suffix], ops)
    if suffix in (".json", ".jsonl"):
        assume(not crashes_pyarrow(data))
    check(suffix, data)


def test_the_valid_files_read():
    for suffix in (".json", ".jsonl", ".csv", ".txt"):
        check(suffix, VALID_FILES[suffix])
    check(".zip", VALID_FILES[".zip"])


@pytest.mark.parametrize("suffix", list(VALID_FILES))
def test_mutated_files(suffix):
    run_fuzz(FAST_EXAMPLES, lambda ops: check_mutated(suffix, ops))


@pytest.mark.slow
@pytest.mark.parametrize("suffix", list(VALID_FILES))
def test_thousands_of_mutated_files(suffix):
    run_fuzz(SLOW_EXAMPLES, lambda ops: check_mutated(suffix, ops))
