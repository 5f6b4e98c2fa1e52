"""tpmpi.core.arraylib: the backends' own methods (NumPy's memory peak through tracemalloc, CuPy's
through its memory-pool hook, a backend seen with another GPU-aware decision). Every backend
against the float64 reference: test_backends.py."""
from __future__ import annotations

import numpy as np

from tpmpi.core.arraylib import Backend, CupyBackend


def test_numpy_memory_peak_counts_allocations_inside_the_block():
    backend = Backend("numpy", np)
    kept = np.ones(1000)
    with backend.memory_peak() as mem:
        a = np.empty(2**16)
        del a
        b = np.empty(2**14)
    assert 2**16 * 8 <= mem["peak"] < 2**16 * 8 + 2**14 * 8 + 4096
    assert kept.size and b.size


def test_a_view_with_another_gpu_aware_decision_shares_the_arrays():
    backend = Backend("numpy", np)
    view = backend.with_gpu_aware(True)
    assert view.gpu_aware and not backend.gpu_aware and view.xp is np
    assert backend.with_gpu_aware(True) is view and view.with_gpu_aware(False) is backend
    assert backend.with_gpu_aware(False) is backend


def test_cupy_memory_peak_hook_takes_cupys_keyword_calls(monkeypatch):
    """CuPy calls ``hook.malloc_postprocess(device_id=, size=, mem_size=, mem_ptr=, pmem_id=)``
    and ``hook.free_postprocess(device_id=, mem_size=, mem_ptr=, pmem_id=)``; replayed here on a
    stand-in ``cupy.cuda.memory_hook`` module."""
    import sys
    import types

    active = []

    class MemoryHook:
        def __enter__(self):
            active.append(self)
            return self

        def __exit__(self, *exc):
            active.remove(self)

    hook_mod = types.ModuleType("cupy.cuda.memory_hook")
    hook_mod.MemoryHook = MemoryHook
    cuda = types.ModuleType("cupy.cuda")
    cuda.memory_hook = hook_mod
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.memory_hook", hook_mod)

    def malloc(size, ptr):
        for h in active:
            h.malloc_postprocess(device_id=0, size=size, mem_size=size, mem_ptr=ptr, pmem_id=ptr)

    def free(size, ptr):
        for h in active:
            h.free_postprocess(device_id=0, mem_size=size, mem_ptr=ptr, pmem_id=ptr)

    with CupyBackend(cupy, 0).memory_peak() as mem:
        free(4096, 1)        # an array from before the block: usage drops below the start
        malloc(1024, 2)
        malloc(2048, 3)      # peak: -4096 + 3072
        free(1024, 2)
        malloc(8192, 4)      # peak: -4096 + 2048 + 8192 = 6144
        malloc(10**9, 0)     # failed allocation (mem_ptr 0): not counted
    assert not active and mem["peak"] == 6144
