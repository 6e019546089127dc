#!/usr/bin/env bash
# Installs everything the appliance, its lab and its tests need on a fresh
# Debian machine (run as root): Debian packages with apt-get, then a virtual
# environment in .venv with the project and its test dependencies.
# Idempotent and quick when nothing changed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: run as root (apt-get, network namespaces, iptables, NFQUEUE)" >&2
    exit 1
fi

packages=(iptables nftables iproute2 procps libnetfilter-queue-dev libnfnetlink-dev nginx-light curl
          iperf3 tcpdump ethtool wrk build-essential python3-dev python3-venv
          chromium fonts-liberation  # chromium: the panel's browser tests (Playwright drives it headless)
          keepalived  # VRRP for the two-gateway lab (`appliance lab up --gateways 2`)
          redis-server  # the gateway pair's replication transport (and its tests)
          libmnl-dev  # the native NFQUEUE binding (nfq/native) is built from source against it
          libxxhash-dev  # the stream digest's XXH3 state shared with the fast path (checkpoint/native)
          clang-14 libclang-rt-14-dev)  # its fuzzing harness: libFuzzer, ASan, UBSan
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bootstrap: apt-get install ${missing[*]}"
    # never let package scripts start services (nginx) on the host: the lab runs its own
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "bootstrap: Python 3.11 or newer is needed ($python is $("$python" -V 2>&1))" >&2
    exit 1
fi
stamp=.venv/.bootstrap-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    echo "bootstrap: virtual environment in .venv"
    [ -x .venv/bin/python ] || "$python" -m venv .venv
    # pip's and the build backend's chatter goes to a log, shown only when the install fails
    if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[test]'; } >.venv/pip.log 2>&1; then
        cat .venv/pip.log >&2
        echo "bootstrap: pip install failed (log above, also in .venv/pip.log)" >&2
        exit 1
    fi
    .venv/bin/python -c 'import netfilterqueue, iptc, fastapi, uvicorn, scapy, hypothesis, cffi, xxhash'
    rm -f .venv/.bootstrap-*
    touch "$stamp"
fi
# the native modules (the NFQUEUE binding nfq/native, the digest search checkpoint/native),
# compiled from their C source when it changed
if ! .venv/bin/python -m nfq.native.build --check; then
    .venv/bin/python -m nfq.native.build
fi
