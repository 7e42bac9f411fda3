"""``allocator``: long model runs move to jemalloc where the system has it; glibc's malloc tuned where it stays."""

import os
import subprocess
import sys
from types import SimpleNamespace

from conftest import require

from grpo_math import allocator, cli
from grpo_math.allocator import find_jemalloc, jemalloc_env

GLIBC_ENV = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GRPO_MATH_MALLOC")}


def test_jemalloc_env_preloads_once_and_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    lib = "/usr/lib/libjemalloc.so.2"
    env = jemalloc_env({"PATH": "/bin"}, lib)
    assert env == {"PATH": "/bin", "LD_PRELOAD": lib}
    assert jemalloc_env(env, lib) is None  # the re-executed process does not re-execute again
    assert jemalloc_env({"LD_PRELOAD": "/x/libfoo.so"}, lib)["LD_PRELOAD"] == f"{lib}:/x/libfoo.so"
    assert jemalloc_env({"LD_PRELOAD": "/x/libtcmalloc.so.4"}, lib) is None
    assert jemalloc_env({"GRPO_MATH_MALLOC": "system"}, lib) is None
    assert jemalloc_env({}, None) is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert jemalloc_env({}, lib) is None


def test_use_jemalloc_reexecutes_the_same_command_line_under_it():
    """End to end: the process re-executes itself with jemalloc loaded, once, and runs its code there."""
    require(find_jemalloc() is not None, "libjemalloc (apt install libjemalloc2)")
    code = (
        "import os; from grpo_math.allocator import use_jemalloc, glibc_malloc; use_jemalloc(); "
        "print('jemalloc' in open('/proc/self/maps').read(), glibc_malloc(), os.environ['LD_PRELOAD'])"
    )
    out = subprocess.run([sys.executable, "-c", code], env=GLIBC_ENV, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", find_jemalloc()], out


def test_cli_moves_only_its_own_long_model_commands(monkeypatch):
    """``main()`` from the process's command line re-executes train and sft; a call with ``argv`` (a test, a
    script) or another command (eval decodes faster on glibc's malloc) never does."""
    calls = []
    monkeypatch.setattr(cli, "use_jemalloc", lambda: calls.append(sys.argv[1]))
    monkeypatch.setattr(
        cli.importlib,
        "import_module",
        lambda name: SimpleNamespace(
            **dict.fromkeys(("main", "sft_command", "rft_command", "eval_command", "score_command"), lambda rest: 0)
        ),
    )
    for name in ("train", "sft", "eval", "rft", "score"):
        monkeypatch.setattr(sys, "argv", ["grpo-math", name, "--x"])
        assert cli.main() == 0
        assert cli.main([name, "--x"]) == 0
    monkeypatch.setattr(sys, "argv", ["grpo-math", "train", "--help"])
    cli.main()
    assert calls == ["train", "sft"]


def test_glibc_tuning_stands_aside_under_jemalloc(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert allocator.reuse_freed_memory() is False


def test_freed_memory_is_reused_without_new_page_faults_and_returned_between_steps():
    """``allocator.reuse_freed_memory``: a 64 MB tensor allocated after another was freed faults its pages in afresh
    by default (glibc maps and unmaps such blocks), and not once the process keeps freed memory; after a training
    step (``callbacks.TrimFreedMemory``) the freed memory has gone back to the system (the next tensor faults)."""
    script = """
import resource, torch
from types import SimpleNamespace
from grpo_math.callbacks import TrimFreedMemory
from grpo_math.allocator import reuse_freed_memory

def fresh():  # page faults of writing a new 64 MB tensor
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def second():  # the same after another was written and freed
    torch.ones(2**24)
    return fresh()

step_4 = SimpleNamespace(global_step=4)
default, reused = second(), reuse_freed_memory()
kept = min(second() for _ in range(3))  # the least of three: now and then the first reuse still faulted (1 in 5)
print(default, reused, kept, TrimFreedMemory(every=2).on_step_end(None, step_4, None) or fresh())
"""
    out = subprocess.run([sys.executable, "-c", script], env=GLIBC_ENV, capture_output=True, text=True, check=True)
    out = out.stdout.split()
    pages = 2**26 // 4096
    assert int(out[0]) > pages // 2 and out[1] == "True" and int(out[2]) < pages // 20, out
    assert int(out[3]) > pages // 2, out


def test_reusing_freed_memory_is_skipped_without_glibc(monkeypatch):
    """Where the C library has no ``mallopt`` (macOS, Windows) nothing changes and the call says so."""
    import ctypes

    from grpo_math.allocator import reuse_freed_memory

    monkeypatch.setattr(ctypes, "CDLL", lambda name: SimpleNamespace())
    assert reuse_freed_memory() is False


def test_a_linux_run_without_jemalloc_is_told_how_to_get_it(monkeypatch):
    """The hint ``train`` prints before a CPU run: only on Linux, on glibc's malloc, with no jemalloc to move to,
    and not when the user chose glibc's."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(allocator, "glibc_malloc", lambda: True)
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    hint = allocator.missing_jemalloc_hint({})
    assert "apt install libjemalloc2" in hint and "\n" not in hint
    assert allocator.missing_jemalloc_hint({"GRPO_MATH_MALLOC": "system"}) is None
    assert allocator.missing_jemalloc_hint({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: "/usr/lib/libjemalloc.so.2")
    assert allocator.missing_jemalloc_hint({}) is None  # there is one: train re-executes under it instead
    monkeypatch.setattr(allocator, "find_jemalloc", lambda: None)
    monkeypatch.setattr(allocator, "glibc_malloc", lambda: False)
    assert allocator.missing_jemalloc_hint({}) is None  # another C library (musl)
    monkeypatch.setattr(allocator, "glibc_malloc", lambda: True)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.missing_jemalloc_hint({}) is None
