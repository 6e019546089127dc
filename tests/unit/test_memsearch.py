"""checkpoint.memsearch: every in-place search gives bytes.find's answers, on every buffer type,
every start, haystacks on both sides of the small-search threshold and of the SIMD blocks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from checkpoint import memsearch

NEEDLES = [b"\r\nDate: ", b"ab", b"\x00", b"abcabd", b"a" * 40]
NAMES = sorted(memsearch.IMPLEMENTATIONS)
# every SIMD level this CPU runs (test_the_simd_search_is_in_use_here checks the best one is
# what /proc/cpuinfo says)
LEVELS = {name: level for name, level in {"memfind/avx2": 2, "memfind/sse2": 1}.items()
          if level <= memsearch.simd_level()}


@pytest.fixture(params=["bytes.find", "memmem", *LEVELS])   # (it only chooses the search: the same for
def impl(request: pytest.FixtureRequest) -> Iterator[str]:  # every example)
    name = request.param.split("/")[0]
    before, level = memsearch.use(name), memsearch.simd_level()
    try:
        if request.param in LEVELS:
            assert memsearch.simd_level(LEVELS[request.param]) == LEVELS[request.param]
        yield request.param
    finally:
        memsearch.use(before)
        memsearch.simd_level(level)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from([b"a", b"b", b"c", b"\r\n", b"Date: ", b"abd", b"\x00"]), max_size=400),
       pad=st.integers(0, 2000), needle=st.sampled_from(NEEDLES), start=st.integers(-50, 3000),
       kind=st.sampled_from(["bytes", "bytearray", "memoryview"]))
def test_find_is_bytes_find(impl: str, parts: list[bytes], pad: int, needle: bytes, start: int, kind: str) -> None:
    hay = b"z" * pad + b"".join(parts)
    buf: bytes | bytearray | memoryview = {"bytes": hay, "bytearray": bytearray(hay),
                                           "memoryview": memoryview(hay)}[kind]
    assert memsearch.find(buf, needle, start) == hay.find(needle, start)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=0, max_size=3000), needle=st.binary(min_size=1, max_size=70),
       at=st.integers(0, 3000))
def test_any_bytes_any_needle_planted_anywhere(impl: str, data: bytes, needle: bytes, at: int) -> None:
    hay = data[:at] + needle + data[at:]
    assert memsearch.find(hay, needle) == hay.find(needle)
    assert memsearch.find(data, needle) == data.find(needle)


def test_every_position_around_the_blocks(impl: str) -> None:
    """A match at each offset of a 600-byte haystack, in each of its last blocks (where the SIMD
    loop hands over to the bytewise tail), for needles of 1, 2, 8 and 33 bytes."""
    for needle in (b"\r", b"\r\n", b"\r\nDate: ", b"\r" + b"x" * 31 + b" "):
        for n in range(512, 600):
            for at in range(n - len(needle) + 1):
                hay = bytearray(b"y" * n)
                hay[at:at + len(needle)] = needle
                assert memsearch.find(hay, needle) == at, (needle, n, at)
            assert memsearch.find(b"y" * n, needle) == -1


def test_the_simd_search_is_in_use_here() -> None:
    """The README's set-up builds it: the lab and CI measure the fast path."""
    assert memsearch.implementation() == "memfind" and memsearch.available()
    assert NAMES == ["bytes.find", "memfind", "memmem"]
    flags = {f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split()}
    assert memsearch.simd_level() == (2 if "avx2" in flags else 1)   # the best this CPU has


def test_a_slice_of_a_larger_buffer_answers_in_its_own_coordinates(impl: str) -> None:
    big = b"x" * 5000 + b"\r\nDate: " + b"y" * 5000
    mv = memoryview(big)[1000:]
    assert memsearch.find(mv, b"\r\nDate: ") == 4000
    assert memsearch.find(mv, b"\r\nDate: ", 4001) == -1
    assert memsearch.find(mv, b"\r\nDate: ", 3999) == 4000
