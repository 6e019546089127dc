"""The native code under libFuzzer, AddressSanitizer and UndefinedBehaviorSanitizer, for a bounded
time each: the binding's parsers (nfq/native/fuzz_nfqbind.c), seeded with real-shaped netlink
messages, the fast path's flow cache (nfq/native/fuzz_fastpath.c), seeded with real pure ACKs of
both families, and the digest's SIMD search (checkpoint/native/fuzz_memfind.c), whose every answer is
compared with a naive search's.

A crash, a sanitizer report or a leak fails the test with the fuzzer's output (the input that
broke it is in the corpus directory, as ``crash-*``)."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "nfq" / "native"
MEMFIND = ROOT / "checkpoint" / "native"
SECONDS = 30

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQA_PACKET_HDR, NFQA_MARK, NFQA_PAYLOAD, NFQA_CAP_LEN, NFQA_SKB_INFO = 1, 3, 10, 13, 14  # linux/netfilter/nfnetlink_queue.h


def attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * ((4 - n % 4) % 4)


def packet_message(pid: int, payload: bytes, *, mark: int | None = None, cap: int | None = None,
                   skbinfo: int | None = None) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(9))  # nfgenmsg: family, version, queue
    body += attr(NFQA_PACKET_HDR, struct.pack("!IHB", pid, 0x0800, 0))  # packed: 7 bytes
    if mark is not None:
        body += attr(NFQA_MARK, struct.pack("!I", mark))
    if skbinfo is not None:
        body += attr(NFQA_SKB_INFO, struct.pack("!I", skbinfo))
    if cap is not None:
        body += attr(NFQA_CAP_LEN, struct.pack("!I", cap))
    body += attr(NFQA_PAYLOAD, payload)
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET, 0, 0, 0) + body


def tcp_packet(n: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1, 2, 0x50, 0x18, 65535, 0, 0) + b"x" * n
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, b"\xc0\0\2\x0a", b"\xcb\0\x71\x0a") + tcp


def seeds() -> list[bytes]:
    one = packet_message(1, tcp_packet(100), mark=0x10, skbinfo=3)
    return [
        one,
        one + packet_message(2, tcp_packet(1), cap=4000),          # two messages in a datagram
        packet_message(3, tcp_packet(0))[:-3],                      # cut short
        struct.pack("=IHHII", 36, 2, 0, 0, 0) + struct.pack("=i", -1) + b"\0" * 16,  # NLMSG_ERROR
        struct.pack("!H", 20) + tcp_packet(10),                     # checksum: TCP at offset 20
    ]


def fuzz(tmp_path: Path, sources: list[Path], include: Path, libs: list[str], seeds: list[bytes],
         seconds: int, max_len: int) -> None:
    """Build the harness with the sanitizers, run it for ``seconds``: no crash, report or leak."""
    clang = shutil.which("clang-14") or shutil.which("clang")
    if clang is None:
        pytest.fail("clang-14 is missing: run deploy/bootstrap.sh (it installs clang-14 and libclang-rt-14-dev)")
    binary = tmp_path / "fuzz"
    build = subprocess.run(
        [clang, "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined",
         f"-I{include}", *map(str, sources), *libs, "-o", str(binary)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, s in enumerate(seeds):
        (corpus / f"seed{i}").write_bytes(s)
    run = subprocess.run(
        [str(binary), str(corpus), f"-max_total_time={seconds}", f"-max_len={max_len}", "-print_final_stats=1",
         "-rss_limit_mb=2048", f"-artifact_prefix={corpus}/"],
        capture_output=True, text=True, timeout=seconds + 120, cwd=tmp_path)
    tail = "\n".join(run.stderr.splitlines()[-40:])
    assert run.returncode == 0, tail
    runs = int(next(line.split(":")[-1] for line in run.stderr.splitlines()
                    if line.startswith("stat::number_of_executed_units")))
    assert runs > 10_000, tail
    assert not list(corpus.glob("crash-*")) and not list(corpus.glob("leak-*"))


def test_the_parsers_survive_the_fuzzer(tmp_path: Path) -> None:
    fuzz(tmp_path, [HERE / "fuzz_nfqbind.c", HERE / "nfqbind.c"], HERE, ["-lnetfilter_queue", "-lmnl"], seeds(),
         SECONDS, 70000)


def test_the_fast_paths_parser_survives_the_fuzzer(tmp_path: Path) -> None:
    from nfq.build import tcp_options
    from nfq.build import tcp_packet as build

    ts = tcp_options(tsval=5, tsecr=6)
    ack4 = build("192.0.2.10", "203.0.113.10", 40000, 80, 1, 2, 0x10, 2000, ts)
    ack6 = build("2001:db8::1", "2001:db8::2", 40000, 80, 1, 2, 0x10, 2000, ts)
    data4 = build("198.51.100.10", "192.0.2.10", 80, 40000, 1, 2, 0x18, 2000, ts,
                  b"x" * 30 + b"\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT" + b"y" * 100 + b"\r\nDa")
    fuzz(tmp_path, [HERE / "fuzz_fastpath.c", HERE / "fastpath.c", HERE / "nfqbind.c", MEMFIND / "memfind.c",
                    MEMFIND / "xxh3.c", MEMFIND / "xxh3_avx2.c", MEMFIND / "xxh3_avx512.c"], HERE,
         ["-lnetfilter_queue", "-lmnl", f"-I{MEMFIND}"],
         [bytes([0x00]) + ack4, bytes([0x21]) + ack6, bytes([0x4C]) + data4, bytes([0x6C]) + data4,
          bytes([0x5C]) + data4, bytes([0x42]) + ack4[:50]],
         15, 600)


def test_the_simd_search_answers_as_a_naive_one_under_the_fuzzer(tmp_path: Path) -> None:
    date = b"\r\nDate: "
    fuzz(tmp_path, [MEMFIND / "fuzz_memfind.c", MEMFIND / "memfind.c"], MEMFIND, [],
         [bytes([len(date) - 1, 1]) + date + b"HTTP/1.1 200 OK" + date + b"x" * 200,
          bytes([0, 0]) + b"\r" + b"\r\n" * 100,
          bytes([39, 3]) + b"a" * 40 + b"a" * 300],
         15, 4096)
