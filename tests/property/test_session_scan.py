"""The session's by-index scans (`_tag_rows`, `_string_end`) against the bytes methods they
replace, as compiled (C loops) and as plain Python."""

from __future__ import annotations

from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgguard.proxy.session as installed
from tests.pure import compiled_or_pure


@pytest.fixture(scope="module", params=["compiled", "pure"])
def module(request: pytest.FixtureRequest) -> ModuleType:
    return compiled_or_pure(request.param, installed)


def _reference_rows(tag: bytes) -> int | None:
    last = tag.rpartition(b" ")[2]
    return int(last) if last.isdigit() else None


TAGS = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")),
    st.builds(lambda words, n: b" ".join([*words, str(n).encode()]),
              st.lists(st.sampled_from([b"SELECT", b"INSERT", b"0", b"UPDATE", b"COPY", b""]),
                       max_size=3),
              st.integers(min_value=0, max_value=10**30)),
    st.sampled_from([b"", b" ", b"SELECT ", b"BEGIN", b"123", b"SELECT 0", b"INSERT 0 1",
                     b"SELECT 12a", b"SELECT \xd9\xa3", b"X 0000000000000000000012"]),
)


@given(TAGS, st.binary(max_size=8), st.binary(max_size=8))
def test_tag_rows_is_the_last_word_when_all_digits(module: ModuleType, tag: bytes,
                                                    before: bytes, after: bytes) -> None:
    message = b"C" + (len(tag) + 5).to_bytes(4, "big") + tag + b"\0"
    buf = before + message + after
    start = len(before)
    assert module._tag_rows(buf, start, start + len(message)) == _reference_rows(tag)


@given(st.binary(max_size=64), st.data())
def test_string_end_is_find_nul(module: ModuleType, buf: bytes, data: st.DataObject) -> None:
    start = data.draw(st.integers(min_value=0, max_value=len(buf)))
    end = data.draw(st.integers(min_value=start, max_value=len(buf)))
    assert module._string_end(buf, start, end) == buf.find(b"\0", start, end)


# -- the reply FIFO (_Fifo) against collections.deque --------------------------------------------

_FIFO_OPS = st.lists(st.one_of(
    st.tuples(st.just("append"), st.integers(0, 99)),
    st.tuples(st.just("appendleft"), st.integers(0, 99)),
    st.tuples(st.just("popleft"), st.none()),
    st.tuples(st.just("head"), st.none()),
    st.tuples(st.just("clear"), st.none())), max_size=200)


@given(_FIFO_OPS)
def test_fifo_behaves_as_a_deque(module: ModuleType, ops: list[tuple[str, int | None]]) -> None:
    """Whatever the order of appends and pops (the list reused once empty, its front reused
    before it grows), the FIFO holds what a deque would, in the same order."""
    from collections import deque

    fifo, want = module._Fifo(), deque()
    for op, value in ops:
        if op in ("popleft", "head") and not want:
            with pytest.raises(IndexError):
                getattr(fifo, op)()
        elif op == "popleft":
            assert fifo.popleft() == want.popleft()
        elif op == "head":
            assert fifo.head() == want[0]
        elif op == "clear":
            fifo.clear()
            want.clear()
        else:
            getattr(fifo, op)(value)
            getattr(want, op)(value)
        assert len(fifo) == len(want) and bool(fifo) == bool(want) == fifo.nonempty()
        assert list(fifo) == list(want)


@given(st.binary(max_size=30), st.integers(0, 35), st.integers(0, 35), st.binary(max_size=8))
def test_same_name_is_a_slice_comparison(module: ModuleType, buf: bytes, start: int, end: int,
                                         name: bytes) -> None:
    """_same_name (the Bind's kept statement name) agrees with comparing the slice."""
    end = min(max(start, end), len(buf))
    start = min(start, end)
    assert module._same_name(buf, start, end, name) == (buf[start:end] == name)
    if end - start <= 8:
        assert module._same_name(buf, start, end, buf[start:end])
