"""Test-only: hypothesis strategies that damage a valid file the ways files get damaged (and crafted) in the wild.

A mutation is one of: flip a bit, truncate, insert bytes, delete a run of bytes, overwrite bytes, or splice (copy a
run of the file over another place of it). Positions are drawn near the start, near the end (where a zip archive
keeps its directory) or anywhere, and wrap around the file's length, so the same strategy serves files of any size.
The fuzz tests apply one to four mutations to a valid file and hand the result to a lit_llm reader, which must
either read it or raise one of lit_llm's own errors.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

#: Examples per reader in the default suite, and in the ``slow`` variant (``python -m pytest -m slow``).
FAST_EXAMPLES = 200
SLOW_EXAMPLES = 1000


def fuzz_settings(examples: int) -> settings:
    """Reproducible (``derandomize``), no deadline (file reads vary with the machine's load), no example database."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


_positions = st.one_of(st.integers(0, 96), st.integers(-96, -1), st.integers(0, 2**31))
_bytes = st.binary(min_size=1, max_size=24)

mutation = st.one_of(
    st.tuples(st.just("flip"), _positions, st.integers(0, 7)),
    st.tuples(st.just("truncate"), _positions),
    st.tuples(st.just("insert"), _positions, _bytes),
    st.tuples(st.just("delete"), _positions, st.integers(1, 64)),
    st.tuples(st.just("overwrite"), _positions, _bytes),
    st.tuples(st.just("splice"), _positions, _positions, st.integers(1, 256)),
)
mutations = st.lists(mutation, min_size=1, max_size=4)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    """``data`` with the mutations ``ops`` applied in order."""
    out = bytearray(data)
    for op in ops:
        n = len(out)
        where = op[1] % n if n else 0
        if op[0] == "flip" and n:
            out[where] ^= 1 << op[2]
        elif op[0] == "truncate":
            del out[where:]
        elif op[0] == "insert":
            out[where:where] = op[2]
        elif op[0] == "delete":
            del out[where:where + op[2]]
        elif op[0] == "overwrite":
            out[where:where + len(op[2])] = op[2]
        elif op[0] == "splice" and n:
            source = op[2] % n
            out[where:where + op[3]] = out[source:source + op[3]]
    return bytes(out)


def run_fuzz(examples: int, body: Callable[[list[tuple]], None]) -> int:
    """Run ``body`` on ``examples`` mutation lists drawn by hypothesis; fail unless that many ran to the end (none
    rejected by ``assume``, none cut short). Returns the count."""
    done = []

    def one(ops: list[tuple]) -> None:
        body(ops)
        done.append(ops)

    given(mutations)(fuzz_settings(examples)(one))()
    assert len(done) >= examples, f"only {len(done)} of {examples} mutated files were tried"
    return len(done)
