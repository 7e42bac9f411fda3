"""Which malloc a CPU run uses. glibc's heap fragments over a long training run (every step frees and allocates
tensors of new sizes: a packed row's length changes from step to step) and its allocator then searches ever longer
lists of free blocks: over 200 steps of ``recipes/learning.yaml`` the heap's free blocks went 10k → 38k and the
step 6.4 → 12.6 s (docs/performance.md). jemalloc keeps a step's time flat, so the training commands (``train``,
``sft``) re-execute themselves under it where the system has it (``apt install libjemalloc2``), as PyTorch's CPU
launcher (``torch.backends.xeon.run_cpu``) preloads it; ``GRPO_MATH_MALLOC=system`` keeps the C library's.
Evaluation stays on glibc's, tuned by ``reuse_freed_memory``: it decoded 15-28% faster there than under jemalloc.

>>> jemalloc_env({}, "/usr/lib/libjemalloc.so.2")["LD_PRELOAD"]
'/usr/lib/libjemalloc.so.2'
>>> jemalloc_env({"GRPO_MATH_MALLOC": "system"}, "/usr/lib/libjemalloc.so.2") is None
True
"""

from __future__ import annotations

import glob
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_jemalloc() -> str | None:
    """The system's ``libjemalloc.so*`` (the environment's own ``lib`` first, then the usual library folders)."""
    for folder in (os.path.join(sys.prefix, "lib"), *LIBRARY_DIRS):
        found = sorted(glob.glob(os.path.join(folder, "libjemalloc.so*")))
        if found:
            return found[0]
    return None


def jemalloc_env(environ, library: str | None) -> dict | None:
    """The environment to re-execute under ``library``, or None when not to: no library, not Linux, opted out
    (``GRPO_MATH_MALLOC=system``), or already preloaded (this process is the re-executed one)."""
    if library is None or not sys.platform.startswith("linux") or environ.get("GRPO_MATH_MALLOC") == "system":
        return None
    if preloaded_malloc(environ):
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, environ.get("LD_PRELOAD")) if p)
    return env


def use_jemalloc() -> None:
    """Re-execute this process, same command line, under jemalloc when ``jemalloc_env`` says to; otherwise return."""
    env = jemalloc_env(os.environ, find_jemalloc())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def missing_jemalloc_hint(environ=os.environ) -> str | None:
    """A one-line hint for a Linux run left on glibc's malloc because the system has no jemalloc (not when the user
    chose glibc with ``GRPO_MATH_MALLOC=system``, nor elsewhere): ``train`` prints it before a CPU run.

    >>> missing_jemalloc_hint({"GRPO_MATH_MALLOC": "system"}) is None
    True
    """
    if jemalloc_env(environ, "libjemalloc.so") is None or find_jemalloc() is not None or not glibc_malloc():
        return None  # one rule with the re-execution: only where a jemalloc, had there been one, would have run
    return (
        "note: no jemalloc on this system, so glibc's malloc: its heap fragments and a long CPU run slows (the "
        "learning recipe's step 6 -> 11 s over 200 steps); `apt install libjemalloc2` and train runs under it"
    )


def preloaded_malloc(environ=os.environ) -> str | None:
    """The jemalloc or tcmalloc that ``LD_PRELOAD`` puts in place of the C library's malloc, or None."""
    entries = environ.get("LD_PRELOAD", "").replace(" ", ":").split(":")
    return next((e for e in entries if "jemalloc" in e or "tcmalloc" in e), None)


def malloc_name() -> str:
    """The malloc this process allocates with: the preloaded library's path, "glibc", or "other" (macOS, Windows)."""
    return preloaded_malloc() or ("glibc" if _libc("mallopt") is not None else "other")


def glibc_malloc() -> bool:
    """Whether this process allocates with glibc's malloc (not a preloaded jemalloc or tcmalloc)."""
    return malloc_name() == "glibc"


def reuse_freed_memory() -> bool:
    """Have glibc keep the memory this process frees for its next allocations: it maps large blocks (from 128 kB, a
    threshold that adapts up to 32 MB) afresh and returns them on free, so every new large tensor pays a page fault
    per 4 kB page; a CPU training step allocates and frees its large tensors (activations, logits, weight casts)
    every time. With no mapped blocks and no trimming, a fresh 100 MB tensor costs what a reused one does (10.6
    instead of 27.7 ms to write one here), and a learning-recipe GRPO step went from 4.7-5.1 to 4.3 s (the AMX
    Xeon, docs/performance.md). Freed memory stays with the process: training hands it back now and then
    (``trim_freed_memory``). Process-wide and lasting; for CPU runs only (on a GPU machine it would keep a model's
    freed host copy). Returns whether it applied (glibc's malloc only; under jemalloc or elsewhere nothing changes).

    >>> isinstance(reuse_freed_memory(), bool)
    True
    """
    if not glibc_malloc():
        return False
    mallopt = _libc("mallopt")
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def trim_freed_memory() -> None:
    """Hand the memory this process has freed back to the system (glibc's ``malloc_trim``; elsewhere nothing): with
    ``reuse_freed_memory`` alone the heap only grows (100 learning-recipe steps peaked at 7.8 GB against 5.5 GB
    without it), so training calls this every few steps (``callbacks.TrimFreedMemory``; every step would give the
    memory back and with it the gain)."""
    malloc_trim = _libc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def _libc(name: str):
    """The C library's function ``name`` (glibc's ``mallopt``, ``malloc_trim``), or None where it has none."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return None
