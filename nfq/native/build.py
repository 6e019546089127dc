"""Builds the native modules from their C source, in place:

* ``nfq.native._nfqbind``: the NFQUEUE binding (``nfq/native/nfqbind.c``) and the fast path's
  flow cache (``nfq/native/fastpath.c``);
* ``checkpoint.native._memfind``: the digest's search for volatile fields
  (``checkpoint/native/memfind.c``);
* ``checkpoint.native._xxh3``: the digest's XXH3-128 state in shared memory
  (``checkpoint/native/xxh3.c``, over Debian's libxxhash-dev header).

Run by the README's set-up (``deploy/bootstrap.sh``): ``python -m nfq.native.build``.  It needs
a C compiler, libnetfilter-queue-dev, libmnl-dev and libxxhash-dev (Debian packages), and cffi (pip); nothing
prebuilt is downloaded.  ``--check`` exits 1 when a built module is older than its sources.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@dataclass(frozen=True)
class Module:
    name: str            # the dotted module name
    source: Path         # its C source; the header beside it (same stem) holds the cffi declarations
    libraries: tuple[str, ...] = ()
    extra: tuple[Path, ...] = ()  # more C sources compiled in, each with its header's declarations
    compiled: tuple[Path, ...] = ()  # C sources compiled in for the C code's own use (no declarations)

    @property
    def header(self) -> Path:
        return self.source.with_suffix(".h")

    @property
    def sources(self) -> tuple[Path, ...]:
        return (self.source, *self.extra)

    @property
    def headers(self) -> tuple[Path, ...]:
        return tuple(s.with_suffix(".h") for s in self.sources)

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Every file the built module depends on."""
        own = (*self.sources, *self.compiled)
        return (*own, *(h for s in own for h in [s.with_suffix(".h")] if h.exists()))

    @property
    def directory(self) -> Path:
        return self.source.parent

    @property
    def stem(self) -> str:
        return self.name.rsplit(".", 1)[1]

    def built(self) -> Path | None:
        found = sorted(self.directory.glob(f"{self.stem}*.so"))
        return found[0] if found else None

    def up_to_date(self) -> bool:
        so = self.built()
        return so is not None and all(so.stat().st_mtime >= s.stat().st_mtime
                                      for s in (*self.inputs, Path(__file__)))


# the binding and the fast path's flow cache, which decides packets of the binding's batches
# (and masks volatile fields with the digest's search)
MODEL = ROOT / "checkpoint" / "native"
XXH3_WIDE = (MODEL / "xxh3_avx2.c", MODEL / "xxh3_avx512.c")  # the update at each CPU width
NFQBIND = Module("nfq.native._nfqbind", HERE / "nfqbind.c", ("netfilter_queue", "mnl"), (HERE / "fastpath.c",),
                 (MODEL / "memfind.c", MODEL / "xxh3.c", *XXH3_WIDE))
MEMFIND = Module("checkpoint.native._memfind", MODEL / "memfind.c")
XXH3 = Module("checkpoint.native._xxh3", MODEL / "xxh3.c", compiled=XXH3_WIDE)
MODULES = (NFQBIND, MEMFIND, XXH3)


def cdef(header: Path) -> str:
    """The declarations cffi needs: the header's part between its marks."""
    text = header.read_text()
    return text.split("/* cffi-begin */", 1)[1].split("/* cffi-end */", 1)[0]


def up_to_date() -> bool:
    return all(m.up_to_date() for m in MODULES)


def build(module: Module = NFQBIND) -> Path:
    from cffi import FFI  # type: ignore[import-untyped]

    ffi = FFI()
    ffi.cdef("".join(cdef(h) for h in module.headers))
    ffi.set_source(
        module.name, "".join(f'#include "{h.name}"\n' for h in module.headers),
        sources=[str(s) for s in (*module.sources, *module.compiled)],
        include_dirs=sorted({str(s.parent) for s in (*module.sources, *module.compiled)}),
        libraries=list(module.libraries),
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
    )
    tmp = ROOT / "build" / module.stem.lstrip("_")
    tmp.mkdir(parents=True, exist_ok=True)
    out = Path(ffi.compile(tmpdir=str(tmp), verbose=False))
    target = module.directory / out.name
    for old in module.directory.glob(f"{module.stem}*.so"):
        old.unlink()
    out.replace(target)
    return target


def main() -> int:
    if "--check" in sys.argv[1:]:
        return 0 if up_to_date() else 1
    for m in MODULES:
        print(f"native: built {build(m).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
