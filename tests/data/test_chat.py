"""Chat and prompt/completion data (`longtrain.data.chat`): records rendered with a loss mask
into the token store, the mask into the labels of every packing, and bad records refused with
their file and line before anything is written."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from longtrain.data.batch import IGNORE_INDEX, build_batch
from longtrain.data.packing import best_fit, concat_chunk
from longtrain.data.prepare import prepare
from longtrain.data.tokenizer import load_tokenizer
from longtrain.errors import DataError
from longtrain.trainer.step import StepContext, forward_loss, shard_micro_batch

CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}


def _jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def _trained_text(store, doc: int) -> list[str]:
    """The runs of consecutive trained tokens of document `doc`, decoded (EOS shown)."""
    tok = load_tokenizer(store.tokenizer_spec)
    ids = store.doc(doc).astype(np.int64)
    mask = store.loss_mask[store.offsets[doc] : store.offsets[doc + 1]]
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(int(i))
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    eos = store.eos_id
    return [tok.decode([i for i in r if i != eos]) + ("<eos>" if eos in r else "") for r in runs]


def test_byte_template_trains_assistant_turns_and_completions_only(tmp_path):
    src = _jsonl(
        tmp_path / "src" / "a.jsonl",
        [{"text": "plain"}, CHAT, {"prompt": "Q: 2+2?", "completion": " 4"}],
    )
    store = prepare(f"jsonl:{src}", tmp_path / "store", show_progress=False)
    assert store.header["loss_mask"] and store.loss_mask is not None
    # A text before the first chat record trains on every token (the mask was backfilled).
    assert store.loss_mask[: store.offsets[1]].all()
    assert _trained_text(store, 1) == ["hello!<eos>", "4<eos>"]
    tok = load_tokenizer("byte")
    assert tok.decode(store.doc(1)) == (
        "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello!<|user|>\n2+2?\n<|assistant|>\n4"
    )
    assert _trained_text(store, 2) == [" 4<eos>"]
    assert store.header["trained_tokens"] == int(store.loss_mask.sum())


def test_train_on_all_writes_no_mask_and_rebuilds_the_store(tmp_path):
    src = _jsonl(tmp_path / "src" / "a.jsonl", [CHAT])
    masked = prepare(f"jsonl:{src}", tmp_path / "store", show_progress=False)
    everything = prepare(f"jsonl:{src}", tmp_path / "store", show_progress=False, train_on="all")
    assert masked.loss_mask is not None and everything.loss_mask is None
    assert np.array_equal(masked.doc(0), everything.doc(0))  # the same tokens


def test_hf_chat_template_masks_what_each_assistant_turn_adds(tmp_path):
    from tests.data.test_tokenizer import _build_hf_tokenizer

    tok_dir = _build_hf_tokenizer(tmp_path / "tok")
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    src = _jsonl(tmp_path / "src" / "a.jsonl", [CHAT])
    store = prepare(f"jsonl:{src}", tmp_path / "store", tokenizer=str(tok_dir), show_progress=False)
    # The "<s>assistant\n" header is context; the content and the turn's </s> train (</s> is
    # this tokenizer's EOS, and the record ends with it).
    assert _trained_text(store, 0) == ["hello!<eos>", "4<eos>"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2 is not valid JSON"),
        ({"messages": [{"content": "hi"}]}, "line 2: message 0 has no 'role'"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "line 2: message 0 has role 'bot'"),
        (
            {"messages": [{"role": "user", "content": ""}]},
            "line 2: message 0 (user) needs non-empty string 'content'",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "line 2: no assistant turn"),
        ({"prompt": "hi"}, "line 2: 'completion' must be a non-empty string, got missing"),
        ({"title": "x"}, "line 2 has none of the fields 'text', 'messages'"),
    ],
)
def test_a_bad_record_names_file_and_line_and_nothing_is_written(tmp_path, line, message):
    src = _jsonl(tmp_path / "src" / "a.jsonl", [CHAT, line])
    with pytest.raises(DataError, match=re.escape(message)) as err:
        prepare(f"jsonl:{src}", tmp_path / "store", show_progress=False)
    assert str(src) in str(err.value)
    assert not (tmp_path / "store").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary directory left


def _masked_batch(packer):
    """One document of 12 tokens whose mask trains tokens 6..11, packed by `packer` into
    sequences of 8 (so it is cut)."""
    tokens = np.arange(1, 13, dtype=np.int64)
    offsets = np.array([0, 12])
    mask = np.array([0] * 6 + [1] * 6, dtype=np.uint8)
    packing = packer(np.array([12]), 8)
    n = len(packing.seq_offsets) - 1
    return build_batch(tokens, offsets, packing, np.arange(n), 0, "per_document", mask)


@pytest.mark.parametrize("packer", [concat_chunk, best_fit])
def test_a_cut_document_keeps_its_slice_of_the_mask(packer):
    batch = _masked_batch(packer)
    # Label of token t is token t + 1, trained when token t + 1 is: labels 7..12 only.
    trained = batch.labels[batch.labels != IGNORE_INDEX].tolist()
    assert trained == [7, 8, 9, 10, 11, 12]
    # The first chunk (tokens 1..8) holds labels 2..9, of which 7, 8 train; a chunk without
    # any trained label would weigh 0 (per document), never NaN.
    assert torch.isfinite(batch.loss_weights).all()
    per_segment = [
        float(batch.loss_weights[a:b].sum())
        for a, b in zip(batch.cu_seqlens[:-1].tolist(), batch.cu_seqlens[1:].tolist())
    ]
    assert per_segment[0] == pytest.approx(1.0)


def test_a_chunk_with_no_trained_token_weighs_zero():
    tokens = np.arange(1, 13, dtype=np.int64)
    mask = np.array([0] * 8 + [1] * 4, dtype=np.uint8)  # tokens 9..12 train
    packing = concat_chunk(np.array([12]), 4)  # chunks 1-4, 5-8 (its last label, 9), 9-12
    batch = build_batch(tokens, np.array([0, 12]), packing, np.arange(3), 0, "per_document", mask)
    weights = batch.loss_weights.view(3, 4).sum(dim=1)
    assert weights.tolist() == [0.0, pytest.approx(1.0), pytest.approx(1.0)]
    assert torch.isfinite(batch.loss_weights).all()


def test_changing_a_masked_label_changes_neither_loss_nor_gradients():
    from longtrain.config import ModelConfig
    from longtrain.model import build_model

    cfg = ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    cfg.dtype, cfg.attn_backend, cfg.kernel_backend = "float64", "torch", "torch"
    batch = _masked_batch(concat_chunk)
    masked = batch.loss_weights == 0

    ctx = StepContext(device=torch.device("cpu"), dtype="float64", grad_clip=0.0, pad_id=0)

    def loss_and_grads(labels):
        model = build_model(cfg, seed=0)
        loss = forward_loss(model, shard_micro_batch(replace(batch, labels=labels), ctx), ctx)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    want_loss, want_grads = loss_and_grads(batch.labels)
    other = batch.labels.clone()
    assert (batch.labels[masked] == IGNORE_INDEX).all() and masked.any()
    other[masked] = torch.randint(0, 16, (int(masked.sum()),))  # real ids, weight 0
    got_loss, got_grads = loss_and_grads(other)
    assert torch.equal(got_loss, want_loss)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
