"""tpmpi.models.GPT against the independent float64 serial reference (tests/gpt_reference.py) at
world sizes 1-4: the loss, the logits and every gradient for multi-head and grouped-query
attention with n_kv_head below, equal to and above the TP size, n_head not divisible by and
smaller than TP, vocabularies not divisible by TP, bias on and off, sequence parallelism on and
off, dropout 0 and > 0 (the serial run's masks), meshes dp x tp; state-dict round trips,
gradient accumulation, grad_norm, checkpoints across TP size / SP / mesh, the errors of
DESIGN's contract raised on every rank, and the schedule."""
import math

import numpy as np
import pytest
from mpi4py import MPI

import gpt_reference as ref
import tpmpi
from conftest import all_ranks_raise, rel_err
from test_gpt_assembly import serial_masks as assembly_masks
from tpmpi.core.schedule import Collective, GradsReady, Product
from tpmpi.models import GPT, GPTConfig

SEED = 11
# name: (n_head, n_kv_head, vocab, bias); at P = 1..4 these cover kv heads below, equal to and
# above TP, n_head not divisible by and smaller than TP, vocab not divisible by TP
CONFIGS = {"mha": (4, 4, 13, True), "gqa": (4, 2, 13, False), "mqa": (4, 1, 10, True),
           "uneven_heads": (6, 3, 11, True), "few_heads": (3, 3, 7, False)}
TOL = 1e-12


def make_config(n_head, n_kv_head, vocab, bias, *, p=0.0, layers=2, hd=2):
    return GPTConfig(vocab, 8, layers, n_head, n_head * hd, n_kv_head=n_kv_head, dropout=p,
                     bias=bias)


def batch(cfg, B=2, T=6, seed=6, ignored=True):
    """Token ids and targets (one target ignored unless ``ignored`` is False)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    if ignored:
        targets[0, -1] = -100
    return idx, targets


def serial_masks(p, call=0):
    """The serial run's dropout masks of forward call ``call`` (the model's seed)."""
    return assembly_masks(p, seed=SEED, call=call)


def worst(got: dict, want: dict) -> float:
    assert set(got) == set(want)
    return max(rel_err(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("sp,p", [(False, 0.0), (False, 0.3), (True, 0.3)],
                         ids=["nosp-p0", "nosp-p03", "sp-p03"])
def test_matches_the_serial_reference(grid, name, sp, p):
    cfg = make_config(*CONFIGS[name], p=p)
    sd = ref.random_state_dict(cfg, seed=5)
    idx, targets = batch(cfg)
    want_loss, want_logits, want = ref.forward_backward(sd, cfg, idx, targets,
                                                        mask=serial_masks(p))
    model = GPT.from_state_dict(sd, cfg, grid=grid, sequence_parallel=sp, dtype="float64",
                                seed=SEED)
    loss = model(idx, targets)
    model.backward()
    assert abs(loss - want_loss) <= TOL * abs(want_loss)
    grads = model.grad_state_dict()
    assert worst(grads, want) <= TOL
    assert grads["lm_head.weight"] is grads["transformer.wte.weight"]
    if p == 0:  # logits() has no dropout: the reference's are those of the same forward
        assert rel_err(model.logits(idx), want_logits.reshape(2, 6, -1)) <= TOL
    else:  # nor do they change what backward() would use (the second backward accumulates)
        model.logits(idx)
        model.backward()
        assert worst(model.grad_state_dict(), {k: 2 * v for k, v in want.items()}) <= TOL
    # no rank ever holds the full (tokens, vocab) logits of its loss
    z = model.lm_head._saved[1]
    assert z.shape[1] == model.wte.stop - model.wte.start
    assert model.calls == 1


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_meshes_average_the_global_batch(world, dp):
    """dp x tp meshes (4x1, 2x2, 1x4 at P=4), SP on the TP groups: each replica's loss is its
    micro-batch's, the gradients those of the mean over the global batch (equal micro-batches,
    no ignored target), grad_norm that of the whole gradient."""
    if world.size % dp:
        pytest.skip(f"dp={dp} does not divide {world.size}")
    cfg = make_config(4, 2, 11, True, p=0.2)
    sd = ref.random_state_dict(cfg, seed=3)
    idx, targets = batch(cfg, B=2 * dp, T=5, seed=8, ignored=False)
    want_loss, _, want = ref.forward_backward(sd, cfg, idx, targets, mask=serial_masks(0.2))
    with tpmpi.Mesh(world.comm, dp=dp) as mesh:
        model = GPT.from_state_dict(sd, cfg, mesh=mesh, sequence_parallel=mesh.tp.size > 1,
                                    dtype="float64", seed=SEED)
        if dp > 1:  # small buckets: started block by block during backward (without SP)
            model.data_parallel = tpmpi.DataParallel(model, mesh, bucket_bytes=256)
            assert len(model.data_parallel.buckets) > 3
        r = mesh.dp_rank
        loss = model(idx[2 * r:2 * r + 2], targets[2 * r:2 * r + 2])
        model.backward()
        mean = sum(mesh.dp_comm.allgather(loss)) / dp
        grads = model.grad_state_dict()
        norm = model.grad_norm()
    assert abs(mean - want_loss) <= TOL * abs(want_loss)
    assert worst(grads, want) <= TOL
    expect = math.sqrt(sum(float(np.vdot(g, g)) for k, g in want.items()
                           if k != "lm_head.weight"))
    assert abs(norm - expect) <= 1e-12 * expect


def test_dropout_advances_and_accumulates(grid):
    """Two training forwards use calls 0 and 1; gradients accumulate across backwards; logits()
    leaves the saved state, the counter and the gradients alone."""
    cfg = make_config(4, 1, 9, True, p=0.25)
    sd = ref.random_state_dict(cfg, seed=2)
    idx, targets = batch(cfg, T=4, seed=1)
    _, _, g0 = ref.forward_backward(sd, cfg, idx, targets, mask=serial_masks(0.25, 0))
    _, _, g1 = ref.forward_backward(sd, cfg, idx, targets, mask=serial_masks(0.25, 1))
    model = GPT.from_state_dict(sd, cfg, grid=grid, sequence_parallel=grid.size > 2,
                                dtype="float64", seed=SEED)
    model(idx, targets)
    model.backward()
    model(idx, targets)
    model.logits(idx[:, :3])
    model.backward()
    assert model.calls == 2
    assert worst(model.grad_state_dict(), {k: g0[k] + g1[k] for k in g0}) <= TOL
    model.zero_grad()
    assert model.grad_norm() == 0.0


def test_logits_of_the_same_shape_between_forward_and_backward(grid):
    """logits() on the training batch's own shape, run between a forward and its backward,
    writes none of the arrays that backward reads (the layers' input copies, the MLP's GELU
    and Phi reused across steps): the gradients are the reference's."""
    cfg = make_config(4, 2, 13, True)
    sd = ref.random_state_dict(cfg, seed=4)
    idx, targets = batch(cfg, T=4, seed=2)
    _, _, want = ref.forward_backward(sd, cfg, idx, targets)
    model = GPT.from_state_dict(sd, cfg, grid=grid, dtype="float64", seed=SEED)
    for _ in range(2):  # the second forward writes into the first step's arrays
        model.zero_grad()
        model(idx, targets)
        model.logits(idx[::-1])
        model.backward()
    assert worst(model.grad_state_dict(), want) <= TOL


def test_state_dict_round_trips_and_init_is_layout_invariant(world, grid):
    cfg = make_config(6, 2, 11, True, layers=1)
    model = GPT(cfg, grid=grid, seed=3, dtype="float64")
    sd = model.state_dict()
    assert {k: v.shape for k, v in sd.items()} == tpmpi.models.state_dict_shapes(cfg)
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    serial = world.comm.bcast(sd if world.comm.Get_rank() == 0 else None)
    for key in sd:  # the same parameters at any TP size: compare with a TP-1 model on rank 0
        assert np.array_equal(sd[key], serial[key])
    again = GPT.from_state_dict(sd, cfg, grid=grid, dtype="float64").state_dict()
    assert all(np.array_equal(again[k], sd[k]) for k in sd)
    one = MPI.COMM_SELF
    alone = GPT(cfg, grid=tpmpi.ProcessGrid(one, (1, 1)), seed=3, dtype="float64").state_dict()
    assert all(np.array_equal(alone[k], sd[k]) for k in sd)


@pytest.mark.world_sizes(4)
def test_checkpoint_saved_at_tp4_with_sp_loads_at_tp3_without(world, shared_tmp):
    cfg = make_config(4, 2, 13, True)
    sd = ref.random_state_dict(cfg, seed=9)
    idx, targets = batch(cfg)
    grid4 = tpmpi.ProcessGrid(world.comm, (1, 4))
    model = GPT.from_state_dict(sd, cfg, grid=grid4, sequence_parallel=True, dtype="float64")
    loss4 = model(idx, targets)
    path = shared_tmp / "gpt"
    tpmpi.save_checkpoint(path, model)
    assert np.array_equal(np.load(path / "v000001" / "transformer.wte.weight.npy"),
                          sd["transformer.wte.weight"])
    sub = world.comm.Split(0 if world.comm.Get_rank() < 3 else 1)
    if world.comm.Get_rank() < 3:
        loaded = GPT.load_checkpoint(path, grid=tpmpi.ProcessGrid(sub, (1, 3)),
                                     sequence_parallel=False)
        assert not loaded.sequence_parallel and loaded.grid.size == 3
        assert abs(loaded(idx, targets) - loss4) <= TOL * abs(loss4)
        assert worst(loaded.state_dict(), sd) == 0.0
    sub.Free()
    with tpmpi.Mesh(world.comm, dp=2) as mesh:
        on_mesh = GPT.load_checkpoint(path, grid=mesh.tp)
        assert on_mesh.data_parallel is not None
        assert abs(on_mesh(idx, targets) - loss4) <= TOL * abs(loss4)


def test_checkpoint_loads_into_a_model_whose_ranks_hold_no_heads(world, shared_tmp):
    """Two heads over up to four ranks: the ranks without a head hold empty (contiguous) pieces
    of the fused QKV weight, the others strided views; the load reads them all together."""
    cfg = make_config(2, 2, 13, True)
    sd = ref.random_state_dict(cfg, seed=4)
    one = tpmpi.ProcessGrid(MPI.COMM_SELF, (1, 1))
    path = shared_tmp / "heads"
    if world.comm.Get_rank() == 0:
        tpmpi.save_checkpoint(path, GPT.from_state_dict(sd, cfg, grid=one, dtype="float64"))
    world.comm.Barrier()
    model = GPT(cfg, grid=tpmpi.ProcessGrid(world.comm, (1, world.size)), dtype="float64")
    tpmpi.load_checkpoint(path, into=model)
    assert worst(model.state_dict(), sd) == 0.0


def test_errors_are_raised_on_every_rank(world, grid):
    comm = grid.comm
    cfg = make_config(4, 2, 13, True)
    model = GPT(cfg, grid=grid, dtype="float64")
    idx, targets = batch(cfg)
    all_ranks_raise(comm, model.backward, "backward\\(\\) called before forward")
    all_ranks_raise(comm, lambda: model(idx[:, :0], targets[:, :0]), "1 <= T <= block_size=8")
    long = np.zeros((1, 9), dtype=np.int64)
    all_ranks_raise(comm, lambda: model(long, long), "block_size=8")
    bad = idx.copy()
    bad[0, 0] = 13 if comm.Get_rank() == comm.Get_size() - 1 else bad[0, 0]
    all_ranks_raise(comm, lambda: model(bad, targets), "idx contains 13")
    all_ranks_raise(comm, lambda: model(idx, targets[:, :3]), "targets.shape=\\(2, 3\\)")
    all_ranks_raise(comm, lambda: model(idx.astype(float), targets), "integer dtype")
    if comm.Get_size() > 1:
        other = idx.copy()
        other[1, 1] = (other[1, 1] + comm.Get_rank()) % 13
        all_ranks_raise(comm, lambda: model(other, targets), "idx differs across the ranks")
    with pytest.raises(ValueError, match="n_kv_head=3: expected a divisor of n_head=4"):
        GPTConfig(13, 8, 1, 4, 8, n_kv_head=3)
    with pytest.raises(ValueError, match="n_embd=10: expected a multiple of n_head=4"):
        GPTConfig(13, 8, 1, 4, 10)
    sd = ref.random_state_dict(cfg)
    del sd["transformer.h.1.mlp.c_fc.bias"]
    all_ranks_raise(comm, lambda: GPT.from_state_dict(sd, cfg, grid=grid),
                    "missing 'transformer.h.1.mlp.c_fc.bias'")
    if comm.Get_size() > 1:
        seed = 0 if comm.Get_rank() == 0 else 1
        all_ranks_raise(comm, lambda: GPT(cfg, grid=grid, seed=seed), "seed differs")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_low_precision_dtypes_run_close_to_the_reference(grid, dtype):
    cfg = make_config(4, 2, 13, True)
    sd = ref.random_state_dict(cfg, seed=4, scale=0.1)
    idx, targets = batch(cfg)
    want_loss, _, want = ref.forward_backward(sd, cfg, idx, targets)
    model = GPT.from_state_dict(sd, cfg, grid=grid, dtype=dtype, sequence_parallel=True)
    loss = model(idx, targets)
    model.backward()
    tol = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}[dtype]
    assert abs(loss - want_loss) <= tol * abs(want_loss)
    g = model.grad_state_dict()
    assert rel_err(g["transformer.wte.weight"], want["transformer.wte.weight"]) <= 10 * tol


def test_module_protocol_and_schedule(grid):
    cfg = make_config(4, 1, 13, True)
    model = GPT(cfg, grid=grid, sequence_parallel=True)
    names = [n for n, _, _ in model.parameters()]
    assert "transformer.h.0.attn.c_attn.weight" in names and len(names) == len(set(names))
    ops = model.operators()
    assert "lm_head.max_logits" in ops and "transformer.h.1.attn.reduce_y" in ops
    sched = GPT.schedule_for(cfg, batch=2, seq=8, tp=4, sequence_parallel=True)
    colls = [s for s in sched.steps() if isinstance(s, Collective)]
    ops_by_kind = {op: sum(1 for c in colls if c.op == op) for op in
                   ("allgather", "reduce_scatter", "allreduce")}
    # per block: 2 gathers forward, the MLP's dy gather + x re-gather and the attention's dy
    # gather backward; the head's x gather and the embedding's dx gather
    assert ops_by_kind["reduce_scatter"] == 4 * cfg.n_layer + 2
    assert any(c.name.endswith("sum_kv") for c in colls)  # one kv head on 4 ranks
    assert any(isinstance(s, GradsReady) for s in sched.backward)
    assert next(s.name for s in sched.forward if isinstance(s, Product)) == \
        "transformer.h.0.attn.c_attn"
    plain = GPT.schedule_for(cfg, batch=2, seq=8, tp=1, backward=False)
    assert not any(isinstance(s, Collective) for s in plain.steps())
