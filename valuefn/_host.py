"""Host memory settings for the processes the ``valuefn`` command starts.

XLA's CPU backend allocates the temporaries of every call afresh: one update
step of the reference critic (``valuefn.bench.problem.REFERENCE``, 32 x 256
tokens) takes a 1.1 GB block, which glibc maps from the kernel and returns
after the call. Mapped in 4 KiB pages, that is about 280,000 page faults a step,
0.6 to 0.7 s of kernel time on the 2-core benchmark machine, where the step
takes 1.5 s. With transparent huge pages in ``madvise`` mode (the default of
many Linux distributions) glibc 2.35 and later back such blocks with 2 MiB
pages when ``GLIBC_TUNABLES`` has ``glibc.malloc.hugetlb=1``: about 1,000
faults a step. glibc reads its tunables when a process starts, so the command
starts itself again with the tunable set (:func:`rerun_with_huge_pages`).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# Set to 0 to keep the command from starting itself again.
OPT_OUT = "VALUEFN_HUGE_PAGES"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or None."""
    try:
        modes = _THP_MODE.read_text().split()
    except OSError:
        return None
    chosen = [mode[1:-1] for mode in modes if mode.startswith("[")]
    return chosen[0] if chosen else None


def huge_pages_environment(
    environ: Mapping[str, str], *, libc: str, thp_mode: str | None
) -> dict[str, str] | None:
    """``environ`` with :data:`HUGE_PAGES_TUNABLE` added, or None where it changes nothing.

    Nothing changes without glibc, unless the kernel's mode is ``madvise``
    (``always`` already gives huge pages, ``never`` gives none), when the
    tunable is already set, or when ``VALUEFN_HUGE_PAGES=0``.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (
        libc != "glibc"
        or thp_mode != "madvise"
        or "glibc.malloc.hugetlb=" in tunables
        or environ.get(OPT_OUT) == "0"
    ):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, HUGE_PAGES_TUNABLE]))}


def rerun_with_huge_pages(module: str) -> None:
    """Replaces this process by ``python -m module <same arguments>`` with huge pages on.

    Returns (doing nothing) where :func:`huge_pages_environment` says it would
    change nothing. Call it first thing in a program's entry point, before any
    work: the process is replaced, not forked.
    """
    if sys.platform != "linux":
        return
    environ = huge_pages_environment(
        os.environ, libc=platform.libc_ver()[0], thp_mode=transparent_huge_pages()
    )
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], environ)
