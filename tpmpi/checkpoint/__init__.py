"""MPI-IO checkpoints of sharded layers: one standard ``.npy`` per parameter + ``manifest.json``.

A checkpoint is a directory::

    manifest.json           the commit point: format, tpmpi version, class, constructor config,
                            grid saved from and, per parameter: file, global shape, logical
                            dtype, the file's .npy dtype, layout, header bytes, checksum
    v000007/weight.npy      the parameters of the committed version: plain NumPy files of the
    v000007/bias.npy        global arrays (``numpy.load`` reads them without MPI); composites
    v000007/fc1.weight.npy  (composites, e.g. ParallelMLP, prefix the names with their
                            children's names: :func:`tpmpi.layers.named_layers`)
    v000007/state/adam.m/fc1.weight.npy   ``state=`` arrays (an optimizer's), sharded like
                            their parameter; the manifest's ``state`` section lists them and
                            ``meta`` holds the caller's small JSON dict
    .lock                   only while a save runs (pid, host, start time; refreshed every
                            few seconds)

dtypes: the .npy files hold float64/float32/float16 as themselves; **bfloat16 is stored as its
2-byte bit pattern with .npy dtype ``<u2``** (NumPy has no bfloat16, and a ``|V2`` file would
load as opaque void data), the manifest's ``dtype`` saying ``bfloat16``. Get the values back
with ``numpy.load(f).view(ml_dtypes.bfloat16)``. Format 1 (files beside the manifest, bfloat16
as ``|V2``) still loads.

Save (collective over the layer's grid): every argument is agreed first (path, the layers'
identities, parameter names/shapes/dtypes). Rank 0 creates the lock with ``O_CREAT|O_EXCL`` (a
save already running on that path is refused with a clear error on every rank; a lock whose
holder died, i.e. a dead pid on this host or a heartbeat older than :data:`LOCK_STALE_S`, is
taken over; a ``.lock`` that is not a file is named, never removed), removes what earlier
crashed saves left (version directories the manifest does not name, ``*.tmp-*``) and creates
the next version directory. Every rank writes its blocks there (rank 0 the .npy headers;
``Write_at_all`` through a file view; a replicated block by its lowest holder), reads them back
and fsyncs the file; the checksums are computed from the files as written. Rank 0 then writes
the manifest under a temporary name, fsyncs it and the version directory, and **switches
``manifest.json`` with one ``os.replace``**: the whole commit. Only after that are the previous
version and the lock removed. A crash at any point leaves either the previous or the new
checkpoint loadable, complete and never a mix (tests/test_checkpoint_crash.py kills a rank at
every step).

Failed writes (a full or failing file system): every MPI-IO call's error, the bytes its status
counts and the bytes read back are checked, and every POSIX write, fsync and rename; the outcome
is agreed over the ranks before the next collective (:class:`~tpmpi.checkpoint.npyfile.AgreedFile`),
so a failure on one rank raises the same ValueError on every rank -- the file and the reason,
``save_checkpoint('/x') failed: writing /x/v000002/weight.npy: No space left on device (rank
1); '/x' still holds v000001, unchanged`` -- after rank 0 has removed the new version and the
lock (tests/test_checkpoint_faults.py fails writes, fsyncs and resizes on one rank through an
``LD_PRELOAD`` shim, under MPICH and Open MPI).

Under a mesh (a :class:`~tpmpi.DataParallel`, or a module built on ``mesh.tp``) every rank of the
mesh calls save and load: replica 0 writes, the other replicas check that they hold the same
values and share the outcome; every replica loads its own blocks.

Checksum (grid-independent, a function of the global array alone): ``crc32`` of every
``chunk_bytes`` chunk of the data bytes (C order, as in the file), then ``crc32`` of those values
as little-endian uint32 in order. Computed in parallel (rank q reads chunks q, q+P, ...),
combined with one Allreduce; load recomputes it the same way.

Load (collective): every argument is agreed first (path, class, into=, verify, options); rank 0
reads the manifest, validates its schema and every file (present, header matching, exact size)
and broadcasts the verdict, so every rank raises the same error. Each rank then reads only its
block (``Read_at_all`` through a file view), on any world size and grid shape; a dtype cast that
would overflow (e.g. to float16) is refused on every rank. Do not load a path while another
job saves to it: the save removes the previous version once it has committed.

Modules: :mod:`~tpmpi.checkpoint.params` (a layer's distributed parameters),
:mod:`~tpmpi.checkpoint.npyfile` (parallel .npy I/O and the checksum),
:mod:`~tpmpi.checkpoint.manifest` (the commit point's schema), :mod:`~tpmpi.checkpoint.lock`
(the save lock), :mod:`~tpmpi.checkpoint.save` and :mod:`~tpmpi.checkpoint.load`.
"""
from .load import load_checkpoint
from .save import save_checkpoint

__all__ = ["load_checkpoint", "save_checkpoint"]
