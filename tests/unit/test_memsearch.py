"""checkpoint.memsearch: the in-place substring search gives bytes.find's answers, on every
buffer type, every start, haystacks on both sides of the small-search threshold."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint import memsearch

NEEDLES = [b"\r\nDate: ", b"ab", b"\x00", b"abcabd"]


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.sampled_from([b"a", b"b", b"c", b"\r\n", b"Date: ", b"abd", b"\x00"]), max_size=400),
       pad=st.integers(0, 2000), needle=st.sampled_from(NEEDLES), start=st.integers(-50, 3000),
       kind=st.sampled_from(["bytes", "bytearray", "memoryview"]))
def test_find_is_bytes_find(parts: list[bytes], pad: int, needle: bytes, start: int, kind: str) -> None:
    hay = b"z" * pad + b"".join(parts)
    buf: bytes | bytearray | memoryview = {"bytes": hay, "bytearray": bytearray(hay),
                                           "memoryview": memoryview(hay)}[kind]
    assert memsearch.find(buf, needle, start) == hay.find(needle, start)


def test_the_fast_path_is_in_use_here() -> None:
    """cffi is a dependency and glibc has memmem: the lab and CI measure the fast path."""
    assert memsearch.available()


def test_a_slice_of_a_larger_buffer_answers_in_its_own_coordinates() -> None:
    big = b"x" * 5000 + b"\r\nDate: " + b"y" * 5000
    mv = memoryview(big)[1000:]
    assert memsearch.find(mv, b"\r\nDate: ") == 4000
    assert memsearch.find(mv, b"\r\nDate: ", 4001) == -1
