"""Evaluation on held-out documents (`longtrain.data.validation`, `longtrain.trainer.evaluate`):
a split that depends on the store alone and never trains, an evaluation that equals the
loss computed directly, does not touch the model, and repeats exactly; the plots."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longtrain.config.rules import validate_run_config
from longtrain.data.batch import build_batch
from longtrain.data.setup import build_schedule
from longtrain.data.validation import split_documents
from longtrain.errors import ConfigError
from longtrain.model import build_model
from longtrain.train import load_config, train
from longtrain.trainer.evaluate import Evaluator, position_buckets
from longtrain.trainer.step import StepContext, forward_loss, shard_micro_batch
from tests.fixtures import make_store, write_text_corpus
from tests.test_train import SMALL, data_overrides


def test_the_split_depends_on_the_store_alone_and_holds_one_each_way():
    train_ids, val_ids = split_documents(200, 0.1)
    again = split_documents(200, 0.1)
    assert np.array_equal(train_ids, again[0]) and np.array_equal(val_ids, again[1])
    assert not set(train_ids) & set(val_ids) and len(train_ids) + len(val_ids) == 200
    assert 5 < len(val_ids) < 40  # ~20 of 200
    small = split_documents(2, 0.01)
    assert len(small[0]) == 1 and len(small[1]) == 1
    assert len(split_documents(10, 0)[1]) == 0


@pytest.mark.parametrize("packing", ["best_fit", "concat_chunk", "decomposition"])
def test_held_out_documents_never_train(tmp_path, packing):
    store = make_store(tmp_path, num_docs=60)
    cfg = load_config(["data.seq_len=64", f"data.packing={packing}", "data.val_fraction=0.2"])
    _, val_ids = split_documents(store.num_docs, 0.2)
    schedule = build_schedule(store, cfg)
    seen = set()
    for step in range(40):
        plan = schedule.plan(step)
        chunks = np.concatenate(
            [np.arange(plan.packing.seq_offsets[s], plan.packing.seq_offsets[s + 1])
             for s in plan.seq_ids]
        )  # fmt: skip
        seen |= set(plan.packing.doc_ids[chunks].tolist())
    assert seen and not seen & set(val_ids.tolist())


def _evaluator(tmp_path):
    store = make_store(tmp_path, num_docs=60)
    cfg = load_config([*SMALL, "model.dtype=float64", "data.val_fraction=0.2"])
    cfg.model.vocab_size = store.vocab_size
    cfg.train.eval_sequences = 3
    ctx = StepContext(device=torch.device("cpu"), dtype="float64", grad_clip=0.0, pad_id=0)
    return store, cfg, ctx, Evaluator(store, cfg, 0, 1, ctx)


def test_evaluation_equals_the_loss_computed_directly_and_repeats_exactly(tmp_path):
    store, cfg, ctx, evaluator = _evaluator(tmp_path)
    model = build_model(cfg.model, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = evaluator.evaluate(model, step=7)
    assert first == evaluator.evaluate(model, step=7)  # deterministic
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The same three sequences through the training forward (token weighting).
    mb = build_batch(store.tokens, store.offsets, evaluator.packing, np.arange(3), store.pad_id)
    with torch.no_grad():
        loss_sum = forward_loss(model, shard_micro_batch(mb, ctx), ctx).item()
    assert first["step"] == 7 and first["eval_sequences"] == 3
    assert first["eval_tokens"] == mb.num_trained()
    # float64 throughout: the per-token losses and the tiled sum differ by summation order.
    assert first["eval_loss"] == pytest.approx(loss_sum / mb.num_trained(), rel=1e-12)
    # The buckets partition the trained tokens: their token-weighted mean is the loss.
    buckets = first["loss_by_position"]
    assert list(buckets) == [str(b) for b in position_buckets(64)] == [
        "1", "2", "4", "8", "16", "32", "64"
    ]  # fmt: skip
    positions = mb.position_ids[mb.labels != -100]
    counts = {b: 0 for b in buckets}
    for p in positions.tolist():
        counts[str(1 << int(p).bit_length())] += 1
    mean = sum(buckets[b] * n for b, n in counts.items() if n) / sum(counts.values())
    assert mean == pytest.approx(first["eval_loss"], rel=1e-12)


def test_eval_every_needs_held_out_documents_from_one_place():
    cfg = load_config(["train.eval_every=10"])
    with pytest.raises(ConfigError, match="train.eval_every=10 needs held-out documents"):
        validate_run_config(cfg, 1)
    both = load_config(["data.val_fraction=0.1", "data.val_source=stdlib"])
    with pytest.raises(ConfigError, match="name one of them"):
        validate_run_config(both, 1)


@pytest.mark.parametrize("held_out", ["fraction", "source"])
def test_a_run_writes_eval_lines_and_both_plots(tmp_path, corpus, held_out):
    run = tmp_path / "run"
    overrides = [*SMALL, *data_overrides(corpus, tmp_path / "store"), "train.steps=4"]
    if held_out == "fraction":
        overrides += ["data.val_fraction=0.2"]
    else:  # a corpus of its own, prepared beside the training store
        other = write_text_corpus(tmp_path / "val_corpus", num_docs=20, seed=5)
        overrides += [f"data.val_source=dir:{other}"]
    train(load_config([*overrides, "train.eval_every=2"]), run)
    if held_out == "source":
        assert (tmp_path / "store-val" / "header.json").is_file()
    import json

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [0, 1, 2, 3]
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 3]
    assert all(np.isfinite(r["eval_loss"]) and r["eval_tokens"] > 0 for r in evals)
    assert (run / "metrics.png").is_file() and (run / "loss_by_position.png").is_file()
