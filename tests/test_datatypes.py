"""tpmpi.core.datatypes: the MPI types of the dtypes (2-byte floats as words), the cached
subarray types and the gather plans cut under the message limit, their datatypes freed when the
caches evict them."""
import numpy as np
from mpi4py import MPI

from problems import HALFS
from tpmpi.core import datatypes


def test_gather_pieces_split_rows_then_columns():
    # 2 ranks, float64: a call carries at most limit // (2 * 8) elements
    pieces = datatypes._gather_pieces
    assert pieces((5, 4), 8, 2, 2 * 8 * 20) == [((0, 5), None)]
    assert pieces((5, 4), 8, 2, 2 * 8 * 8) == [((0, 2), None), ((2, 4), None), ((4, 5), None)]
    assert pieces((2, 5), 8, 2, 2 * 8 * 2) == [
        ((0, 1), (0, 2)), ((0, 1), (2, 4)), ((0, 1), (4, 5)),
        ((1, 2), (0, 2)), ((1, 2), (2, 4)), ((1, 2), (4, 5))]
    assert pieces((3,), 2, 4, 16) == [((0, 2), None), ((2, 3), None)]
    assert pieces((0, 7), 4, 3, 8) == [((0, 0), None)]


def test_half_precision_moves_as_two_byte_words():
    assert datatypes.mpi_type("float16") == MPI.UINT16_T
    assert datatypes.mpi_type("float32") == MPI.FLOAT
    assert datatypes.mpi_type("float64") == MPI.DOUBLE
    assert datatypes.mpi_type("float32").is_predefined  # not a Dup the caller would have to free
    assert datatypes.reduction_dtype("float16") == np.float32
    assert datatypes.reduction_dtype("float64") == np.float64
    half = np.ones(3, np.float16)
    assert datatypes.as_words(half).dtype == np.uint16 and datatypes.as_words(half).base is half
    if "bfloat16" in HALFS:
        assert datatypes.mpi_type("bfloat16") == MPI.UINT16_T
        assert datatypes.reduction_dtype("bfloat16") == np.float32


def test_subarray_types_are_cached_and_freed_on_eviction(monkeypatch):
    monkeypatch.setattr(datatypes, "_TYPES", datatypes.LRU(2, datatypes._TYPES._evict))
    first = datatypes.subarray_type("float32", (4, 6), (0, 2), (4, 2))
    assert datatypes.subarray_type("float32", (4, 6), (0, 2), (4, 2)) is first
    assert first.Get_size() == 4 * 2 * 4 and first.Get_extent() == (0, 4 * 6 * 4)
    datatypes.subarray_type("float32", (4, 6), (0, 4), (4, 2))
    datatypes.subarray_type("float64", (4, 6), (0, 4), (4, 2))  # evicts ``first``
    assert first == MPI.DATATYPE_NULL  # freed (mpi4py resets a freed handle)
    assert datatypes.subarray_type("float32", (4, 6), (0, 2), (4, 2)) is not first


def test_a_gather_plan_is_made_once_and_owns_its_types(monkeypatch):
    """Repeated calls of one gather shape reuse one plan; evicting it frees its derived types
    (the receive types, and a send type made for a column window)."""
    monkeypatch.setattr(datatypes, "_PLANS", datatypes.LRU(1, datatypes._PLANS._evict))
    local, out = np.zeros((3, 2)), np.zeros((3, 5))
    blocks = [((0, 0), (3, 2)), ((0, 2), (3, 3))]
    (send, recv), = datatypes.alltoallw_args(local, out, blocks, 0)
    again, = datatypes.alltoallw_args(local, out, blocks, 0)
    assert again[1][3] == recv[3] and recv[1] == [1, 1] and send[1] == [6, 6]
    types = [t for t in recv[3] if not t.is_predefined]
    assert len(types) == 2
    datatypes.alltoallw_args(local, out, blocks, 0, limit=2 * 8)  # another plan: evicts
    assert all(t == MPI.DATATYPE_NULL for t in types)
