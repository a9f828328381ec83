"""Give a worker's freed heap back to the system between batches.

glibc keeps what a process frees in its arenas for reuse: a decoding worker that built a page's features
(a 300 dpi scan is ~100 MB while it is made) or a replica that ran a call keeps that peak resident for as
long as it lives, idle or not, and a node runs one decoding worker per core. `malloc_trim(0)` hands the
free pages of every arena back (measured on the 2-core machine: a PreparePages worker after 60 pages of
a PDF, 1.56 -> 1.28 GB resident). pyarrow's allocator (jemalloc or mimalloc in the wheels) keeps its own
freed pages too: `release_unused()` on its default pool hands those back. Setting M_MMAP_THRESHOLD instead (every large buffer its own mapping)
did the same but halved the page rate: each page's buffers are then zero-filled by the kernel again.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library: musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Return the free pages of pyarrow's memory pool and of the C library's malloc arenas to the system."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
