"""tpmpi/studies/clusterplan.py: the CLI's model and size arguments, the ranking of TP x DP
configurations (the 64-GPU case names its choice and the runner-up), the
term-by-term explanation of the 8.67B model at TP 8 on DGX A100, and the JSON records."""
import json

import pytest

from tpmpi.studies.clusterplan import (explain_step, format_cluster_plan, parse_model,
                                       parse_sizes, plan_cluster, plan_records)
from tpmpi.studies.gptshape import GPTShape

MODEL_8B = "layers=42,hidden=4096,heads=32,seq=1024,vocab=51200"


def test_parse_model_reads_the_cli_spec():
    assert parse_model(MODEL_8B) == GPTShape(42, 4096, 32, 1024, 51200)
    shape = parse_model("layers=2,hidden=64,heads=4,seq=16,vocab=100,kv_heads=2,dropout=0")
    assert (shape.n_kv_head, shape.dropout) == (2, False)
    with pytest.raises(ValueError, match=r"missing heads, vocab"):
        parse_model("layers=2,hidden=64,seq=16")
    with pytest.raises(ValueError, match=r"'width=3' is not KEY=VALUE with KEY one of layers"):
        parse_model("width=3")
    with pytest.raises(ValueError, match=r"layers='two': expected an integer"):
        parse_model("layers=two")


def test_parse_sizes_reads_lists_and_ranges():
    assert parse_sizes("tp", "1,2,4,8") == [1, 2, 4, 8]
    assert parse_sizes("dp", "1-4,8") == [1, 2, 3, 4, 8]
    for bad in ("0", "4-2", "x", ""):
        with pytest.raises(ValueError, match=r"dp="):
            parse_sizes("dp", bad)


def test_ranking_at_64_gpus_names_the_choice_and_the_runner_up():
    preds = plan_cluster("dgx-a100", parse_model(MODEL_8B), micro_batch=8, global_batch=512,
                         tp=parse_sizes("tp", "1,2,4,8"), dp=parse_sizes("dp", "1-64"),
                         gpus=64, dtype="bfloat16", recompute="selective")
    assert {(p.config.tp, p.config.dp) for p in preds} == {(1, 64), (2, 32), (4, 16), (8, 8)}
    ok = [p for p in preds if not p.refused]
    assert [p.iteration_s for p in ok] == sorted(p.iteration_s for p in ok)
    assert all(p.refused for p in preds[len(ok):])
    text = format_cluster_plan(preds)
    assert f"why {ok[0].label} first" in text and f"runner-up {ok[1].label}" in text
    assert "loses" in text and "most on" in text


def test_the_8b_model_at_tp_8_on_dgx_a100_is_explained_term_by_term():
    (p,) = plan_cluster("dgx-a100", parse_model(MODEL_8B), micro_batch=16, global_batch=16,
                        tp=[8], dp=[1], dtype="float16", recompute="full")
    text = explain_step(p)
    for term in ("per block forward", "per block backward", "per block recompute",
                 "embedding, LM head and loss", ("attn.reduce_y: allreduce of 128.0 MiB over "
                 "tp=8 ring/Simple on nvlink"), "optimizer (adam)", "iteration",
                 "TFLOP/s per GPU", "memory per GPU"):
        assert term in text
    terms = p.iteration_s - p.optimizer_s - p.dp_exposed_s
    assert terms == pytest.approx(p.micro_batches * p.micro_batch_s)


def test_a_refused_configuration_says_why():
    (p,) = plan_cluster("dgx-a100-40gb", parse_model(MODEL_8B), micro_batch=16,
                        global_batch=16, tp=[1], dp=[1], dtype="float16")
    assert "refused: needs" in explain_step(p)
    assert format_cluster_plan([p]).startswith("order") and "no configuration fits" in \
        format_cluster_plan([p])


def test_records_carry_the_contract_fields_in_ranking_order(tmp_path):
    preds = plan_cluster("dgx-h100", parse_model(MODEL_8B), micro_batch=4, global_batch=256,
                         tp=[2, 4, 8], dp=[8, 16], sequence_parallel=True)
    recs = plan_records(preds)
    json.dumps(recs)
    assert [r["order"] for r in recs] == list(range(1, len(preds) + 1))
    for r in recs:
        assert {"layer_fwd_s", "layer_bwd_s", "iteration_s", "tflops_per_gpu", "mfu",
                "mem_per_gpu_bytes"} <= set(r)


def test_no_configuration_of_the_gpus_asked_for():
    with pytest.raises(ValueError, match=r"gpus=3: no tp x dp of the sizes given"):
        plan_cluster("dgx-a100", parse_model(MODEL_8B), micro_batch=1, global_batch=8,
                     tp=[2], dp=[2], gpus=3)
