"""A mount process's malloc settings (lazyfs.malloc), each checked in a fresh process:
the settings are the process's, and a test process's own heap says nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_MALLINFO = """
import ctypes
from lazyfs.malloc import tune_for_mount

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
"""


def _run(program: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _MALLINFO + textwrap.dedent(program)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)


def test_a_chunk_buffer_is_mapped_on_its_own_after_one_was_freed() -> None:
    # glibc's default raises its mmap threshold to a freed mapped block's size: the next
    # chunk buffer would come from the heap, which keeps its free middle
    out = _run("""
        assert tune_for_mount()
        first = bytes(1 << 20)
        del first
        before = libc.mallinfo2().hblks
        second = bytes(1 << 20)
        print(libc.mallinfo2().hblks - before)
    """)
    assert out.stdout.split() == ["1"]


def test_threads_allocate_from_the_one_arena() -> None:
    out = _run("""
        import threading
        assert tune_for_mount()
        kept = []
        t = threading.Thread(target=lambda: kept.extend(bytearray(4096) for _ in range(256)))
        t.start()
        t.join()
        libc.malloc_stats()  # one "Arena N:" paragraph per arena, on stderr
    """)
    assert out.stderr.count("Arena ") == 1, out.stderr


def test_give_back_returns_the_free_middle_of_the_heap() -> None:
    out = _run("""
        from lazyfs.malloc import give_back

        def heap_rss():
            lines = open("/proc/self/smaps").read().splitlines()
            at = next(i for i, line in enumerate(lines) if line.endswith("[heap]"))
            return next(int(line.split()[1]) for line in lines[at:] if line.startswith("Rss:"))

        assert tune_for_mount()
        buffers, kept = [], []
        for _ in range(256):  # read buffers, each followed by a longer-lived object
            buffers.append(bytearray(b"x" * (64 << 10)))
            kept.append(bytearray(b"y" * 1024))
        del buffers
        before = heap_rss()
        give_back()
        print(before - heap_rss())
    """)
    assert int(out.stdout) >= 8 << 10  # KiB: most of the 16 MiB of freed buffers
