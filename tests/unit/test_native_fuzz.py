"""The native binding's parsers under libFuzzer, AddressSanitizer and UndefinedBehaviorSanitizer
(nfq/native/fuzz_nfqbind.c), for a bounded time, seeded with real-shaped netlink messages.

A crash, a sanitizer report or a leak fails the test with the fuzzer's output (the input that
broke it is in the corpus directory, as ``crash-*``)."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[2] / "nfq" / "native"
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


def test_the_parsers_survive_the_fuzzer(tmp_path: Path) -> None:
    clang = shutil.which("clang-14") or shutil.which("clang")
    if clang is None:
        pytest.fail("clang-14 is missing: run deploy/bootstrap.sh (it installs clang-14 and libclang-rt-14-dev)")
    binary = tmp_path / "fuzz"
    build = subprocess.run(
        [clang, "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined",
         f"-I{HERE}", str(HERE / "fuzz_nfqbind.c"), str(HERE / "nfqbind.c"),
         "-lnetfilter_queue", "-lmnl", "-o", str(binary)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, s in enumerate(seeds()):
        (corpus / f"seed{i}").write_bytes(s)
    run = subprocess.run(
        [str(binary), str(corpus), f"-max_total_time={SECONDS}", "-max_len=70000", "-print_final_stats=1",
         "-rss_limit_mb=2048", f"-artifact_prefix={corpus}/"],
        capture_output=True, text=True, timeout=SECONDS + 120, cwd=tmp_path)
    tail = "\n".join(run.stderr.splitlines()[-40:])
    assert run.returncode == 0, tail
    runs = int(next(line.split(":")[-1] for line in run.stderr.splitlines()
                    if line.startswith("stat::number_of_executed_units")))
    assert runs > 10_000, tail
    assert not list(corpus.glob("crash-*")) and not list(corpus.glob("leak-*"))
