"""Builds the native NFQUEUE binding (``nfq.native._nfqbind``) from its C source, in place.

Run by the README's set-up (``deploy/bootstrap.sh``): ``python -m nfq.native.build``.  It needs
a C compiler, libnetfilter-queue-dev and libmnl-dev (Debian packages), and cffi (pip); nothing
prebuilt is downloaded.  ``--check`` exits 1 when the built module is older than its sources.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SOURCES = [HERE / "nfqbind.c", HERE / "nfqbind.h"]


def cdef() -> str:
    """The declarations cffi needs: the header's part between its marks."""
    text = (HERE / "nfqbind.h").read_text()
    return text.split("/* cffi-begin */", 1)[1].split("/* cffi-end */", 1)[0]


def built() -> Path | None:
    found = sorted(HERE.glob("_nfqbind*.so"))
    return found[0] if found else None


def up_to_date() -> bool:
    so = built()
    return so is not None and all(so.stat().st_mtime >= s.stat().st_mtime for s in SOURCES + [Path(__file__)])


def build() -> Path:
    from cffi import FFI  # type: ignore[import-untyped]

    ffi = FFI()
    ffi.cdef(cdef())
    ffi.set_source(
        "nfq.native._nfqbind", '#include "nfqbind.h"',
        sources=[str(HERE / "nfqbind.c")], include_dirs=[str(HERE)],
        libraries=["netfilter_queue", "mnl"],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    )
    tmp = ROOT / "build" / "nfqbind"
    tmp.mkdir(parents=True, exist_ok=True)
    out = Path(ffi.compile(tmpdir=str(tmp), verbose=False))
    target = HERE / out.name
    for old in HERE.glob("_nfqbind*.so"):
        old.unlink()
    out.replace(target)
    return target


def main() -> int:
    if "--check" in sys.argv[1:]:
        return 0 if up_to_date() else 1
    print(f"nfq.native: built {build().relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
