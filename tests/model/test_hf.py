"""Hugging Face models (longtrain/model/hf.py), trained through longtrain.train; the export
of a trained hf run (longtrain/convert/hf_export.py; our own model's: tests/convert).

Tiny random-weight Llama, Qwen2 and Mistral models saved to temp dirs; everything in float64
on CPU. References are transformers' own models with its float64-capable `sdpa` attention,
run document by document. Where transformers rounds to float32 inside (its RMSNorm and RoPE,
and `logits.float()` in its loss), the tolerance says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open
from transformers import (
    LlamaConfig,
    MistralConfig,
)

from longtrain.convert.hf_export import (
    EXPORT_MARKER,
    export_checkpoint,
)
from longtrain.data.batch import IGNORE_INDEX
from longtrain.distributed.memory import apply_memory
from longtrain.eval.passkey import main as passkey_main
from longtrain.model import HFCausalLM, build_model
from longtrain.model.hf import check_seq_len, hf_model_config
from longtrain.train import load_config, train
from tests.hf_cases import (
    F64,
    FAMILIES,
    REPO,
    RUN,
    TINY,
    VOCAB,
    packed,
    random_docs,
    read_losses,
    reference_loss_sum,
    reference_model,
    save_hf_model,
    step_batch,
)

# --------------------------------------------------------------------------------------------
# The wrapper against transformers


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_loss_and_grads_equal_transformers_per_document(hf_dirs, family):
    model = build_model(hf_model_config(hf_dirs[family], **F64), seed=0)
    ref = reference_model(hf_dirs[family])
    docs = random_docs([1, 9, 30, 5, 19], seed=1)  # a 1-token document has nothing to train
    tokens, labels, positions, meta = packed(docs)
    weights = (labels != IGNORE_INDEX).to(torch.float64)
    loss_sum = model(tokens, positions, meta, labels, weights)
    count = int(weights.sum())
    assert count == sum(len(d) - 1 for d in docs)

    # 1. transformers' own loss, each document alone with labels=input_ids (it shifts them):
    # a mean over len - 1 tokens, computed from `logits.float()`, so float32 (rel ~1e-7).
    hf_sum = sum(
        ref(input_ids=d[None], labels=d[None]).loss.double() * (len(d) - 1)
        for d in docs
        if len(d) > 1
    )
    torch.testing.assert_close(loss_sum / count, hf_sum / count, rtol=1e-6, atol=0)

    # 2. The same per-document reference in float64 (our CE on transformers' float64 logits):
    # both sides run the same transformers modules; only attention (varlen vs sdpa) and the
    # tiled CE reassociate float64 sums, and transformers' float32 RMSNorm casts turn that
    # into a float32 rounding flip only with probability ~1e-9 per element.
    ref_sum = sum(
        F.cross_entropy(ref(input_ids=d[None]).logits[0, :-1], d[1:], reduction="sum") for d in docs
    )
    torch.testing.assert_close(loss_sum, ref_sum, rtol=1e-12, atol=0)

    # 3. Gradients of every parameter (ours are HF's names under "hf.").
    loss_sum.backward()
    ref_sum.backward()
    ref_grads = dict(ref.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        g_ref = ref_grads[name.removeprefix("hf.")].grad
        torch.testing.assert_close(p.grad, g_ref, rtol=1e-9, atol=1e-12, msg=name)
        checked += 1
    assert checked == len(ref_grads)


def test_packed_batch_equals_each_document_alone(hf_dirs):
    model = build_model(hf_model_config(hf_dirs["llama"], **F64), seed=0)
    docs = random_docs([7, 1, 40, 16], seed=2)
    tokens, _, positions, meta = packed(docs)
    together = model(tokens, positions, meta)
    alone = []
    for doc in docs:
        doc_tokens, _, doc_positions, doc_meta = packed([doc])
        alone.append(model(doc_tokens, doc_positions, doc_meta))
    alone = torch.cat(alone)
    # float64; per-document attention is the same arithmetic whatever the packing.
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)
    assert together.shape == (len(tokens), 32)


def test_wrapper_interface(hf_dirs):
    model = build_model(hf_model_config(hf_dirs["qwen2"], **F64), seed=0)
    assert isinstance(model, HFCausalLM)
    assert len(model.layers) == 2
    assert model.output_weight() is model.hf.get_input_embeddings().weight  # tied in Qwen2
    cores = [n for n, _ in model.named_modules() if n.endswith("longtrain_core")]
    assert cores == [f"hf.model.layers.{i}.self_attn.longtrain_core" for i in range(2)]
    docs = random_docs([6, 3], seed=3)
    tokens, labels, positions, meta = packed(docs)
    hidden = model(tokens, positions, meta)
    ce = F.cross_entropy(model.logits(hidden), labels, reduction="sum")
    torch.testing.assert_close(model(tokens, positions, meta, labels), ce, rtol=1e-12, atol=0)


def test_autocast_attends_in_the_autocast_dtype(hf_dirs):
    # HF's float32 RoPE tables promote q/k to float32 under autocast while v is bfloat16;
    # the attention function must bring them back to one dtype.
    model = build_model(hf_model_config(hf_dirs["llama"], dtype="bfloat16"), seed=0)
    tokens, _, positions, meta = packed(random_docs([15, 25], seed=5))
    full = model(tokens, positions, meta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model(tokens, positions, meta)
    # bfloat16 matmuls: 8 mantissa bits, relative error ~2^-8 per op over 2 layers; |h| ~ 3.
    torch.testing.assert_close(mixed.float(), full, rtol=0, atol=5e-2)


MEMORY = [dict(mlp_tiles=3, loss_tile_tokens=7), dict(activation_checkpoint="full")]


@pytest.mark.parametrize("memory", MEMORY, ids=["mlp_and_loss_tiles", "activation_checkpoint"])
def test_memory_stack_applies_unchanged(hf_dirs, memory):
    from longtrain.config import MemoryConfig

    tokens, labels, positions, meta = packed(random_docs([15, 25], seed=6))

    def loss_and_grads(mem: MemoryConfig | None):
        model = build_model(hf_model_config(hf_dirs["mistral"], **F64), seed=0)
        if mem is not None:
            apply_memory(model, mem)
        loss = model(tokens, positions, meta, labels)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    loss, grads = loss_and_grads(MemoryConfig(**memory))
    plain_loss, plain_grads = loss_and_grads(None)
    # float64; tiling only splits token-wise sums (recomputation repeats the same arithmetic).
    torch.testing.assert_close(loss, plain_loss, rtol=1e-13, atol=0)
    for g, g_plain in zip(grads, plain_grads):
        torch.testing.assert_close(g, g_plain, rtol=1e-12, atol=1e-15)


def test_set_rope_theta_equals_a_model_built_with_it(hf_dirs, tmp_path):
    # Context-length stages change the RoPE base during a run.
    model = build_model(hf_model_config(hf_dirs["llama"], **F64), seed=0)
    theta = 2e6
    config = FAMILIES["llama"]()
    config.rope_parameters["rope_theta"] = theta
    other = build_model(hf_model_config(save_hf_model(config, tmp_path / "t"), **F64), seed=0)
    tokens, _, positions, meta = packed(random_docs([30, 12], seed=7))
    before = model(tokens, positions, meta)
    model.set_rope_theta(theta)
    # Same weights (same init seed), same float32 RoPE tables: identical arithmetic.
    torch.testing.assert_close(
        model(tokens, positions, meta), other(tokens, positions, meta), rtol=0, atol=0
    )
    assert not torch.allclose(before, other(tokens, positions, meta))


def test_config_comes_from_config_json(hf_dirs):
    cfg = load_config(["model=hf", f"model.path={hf_dirs['mistral']}"]).model
    assert (cfg.name, cfg.vocab_size, cfg.dim, cfg.n_layers) == ("hf", VOCAB, 32, 2)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim) == (4, 2, 8, 64)
    assert cfg == hf_model_config(hf_dirs["mistral"], dtype="float32")
    llama = load_config(["model=hf", f"model.path={hf_dirs['llama']}"]).model
    assert (llama.rope_theta, llama.tie_embeddings) == (5e5, False)
    assert load_config(["model=hf", f"model.path={hf_dirs['qwen2']}"]).model.tie_embeddings


def test_bad_configs_are_refused(hf_dirs, tmp_path):
    overridden = load_config(["model=hf", f"model.path={hf_dirs['llama']}", "model.dim=64"])
    with pytest.raises(ValueError, match=r"model.dim=64 disagrees with .*config.json \(32\)"):
        build_model(overridden.model, seed=0)
    with pytest.raises(Exception, match="model.path"):
        load_config(["model=hf"])
    with pytest.raises(ValueError, match="must be a local Hugging Face model directory"):
        hf_model_config(tmp_path / "nowhere")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'; model=hf supports llama"):
        hf_model_config(gpt2)
    dropout = save_hf_model(LlamaConfig(**TINY, attention_dropout=0.1), tmp_path / "dropout")
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        hf_model_config(dropout)
    dynamic = LlamaConfig(
        **TINY, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
    )
    dynamic.save_pretrained(str(tmp_path / "dynamic"))
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        hf_model_config(tmp_path / "dynamic")


def test_sliding_window_beyond_documents_is_refused(tmp_path):
    path = save_hf_model(MistralConfig(**TINY, sliding_window=8), tmp_path / "mistral8")
    cfg = hf_model_config(path, **F64)
    check_seq_len(cfg, 8)  # documents of <= 8 tokens: full causal == sliding window
    with pytest.raises(ValueError, match="data.seq_len=64 exceeds the sliding window"):
        check_seq_len(cfg, 64)
    model = build_model(cfg, seed=0)
    tokens, _, positions, meta = packed(random_docs([8], seed=0))
    model(tokens, positions, meta)
    tokens, _, positions, meta = packed(random_docs([9], seed=0))
    with pytest.raises(ValueError, match="9 tokens exceeds the sliding window 8"):
        model(tokens, positions, meta)


def test_random_init_without_weights_is_seeded(tmp_path):
    path = tmp_path / "config_only"
    LlamaConfig(**TINY).save_pretrained(str(path))
    cfg = hf_model_config(path, **F64)
    a, b, c = (build_model(cfg, seed=s) for s in (7, 7, 8))
    for (name, pa), (_, pb), (_, pc) in zip(
        a.named_parameters(), b.named_parameters(), c.named_parameters()
    ):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name


# --------------------------------------------------------------------------------------------
# Training through longtrain.train, and export of an hf run


def test_trains_and_exports_an_hf_run(tmp_path, hf_dirs, hf_corpus):
    path = hf_dirs["qwen2"]
    cfg = load_config(
        [
            "model=hf",
            f"model.path={path}",
            *RUN,
            f"data.source=dir:{hf_corpus}",
            f"data.store_dir={tmp_path / 'store'}",
            "train.steps=3",
            "train.ckpt_every=2",
            "train.keep_last=0",
        ]
    )
    run_dir = train(cfg, tmp_path / "run")
    losses = read_losses(run_dir)
    assert len(losses) == 3
    # Step 0 trains the weights of `path`: transformers' loss on the same batch, segment by
    # segment (float64; reassociation only, see the first test).
    mb0 = step_batch(run_dir, 0)
    ref = reference_model(path)
    torch.testing.assert_close(
        losses[0], (reference_loss_sum(ref, mb0) / mb0.num_trained()).item(), rtol=1e-10, atol=0
    )
    # Step 2's loss is that of the weights saved after 2 steps: export them and compare.
    out = export_checkpoint(run_dir / "checkpoints" / "step_00000002", tmp_path / "export")
    trained = reference_model(out)
    mb2 = step_batch(run_dir, 2)
    torch.testing.assert_close(
        losses[2], (reference_loss_sum(trained, mb2) / mb2.num_trained()).item(), rtol=1e-10, atol=0
    )
    assert losses[2] < losses[0] - 0.05  # it trained (lr 1e-2, the same documents recur)
    exported = json.loads((out / "config.json").read_text())
    assert exported["model_type"] == "qwen2" and exported["tie_word_embeddings"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())  # tied: stored once
    # save_pretrained's files are marked as the export's own, so exporting there again works.
    written = json.loads((out / EXPORT_MARKER).read_text())["files"]
    assert "model.safetensors" in written and written == sorted(
        set(os.listdir(out)) - {EXPORT_MARKER}
    )
    export_checkpoint(run_dir / "checkpoints" / "step_00000002", out)
    assert exported["use_cache"] and exported["dtype"] == "float64"
    # Streamed into several files with an index (a 20 kB cap): transformers loads the same
    # weights, bit for bit.
    indexed = export_checkpoint(
        run_dir / "checkpoints" / "step_00000002", tmp_path / "indexed", max_shard_bytes=20_000
    )
    index = json.loads((indexed / "model.safetensors.index.json").read_text())
    assert (
        len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    )
    again = reference_model(indexed)
    for (name, a), (_, b) in zip(trained.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
    # Passkey retrieval reads a model=hf checkpoint the same way as ours.
    passkey_main([str(run_dir), "--lengths", "256", "--depths", "0.5", "--trials", "1"])
    assert json.loads((run_dir / "passkey.json").read_text())["accuracy"] in ([[0.0]], [[1.0]])


# --------------------------------------------------------------------------------------------
# Sequence parallelism: 2 processes equal 1


def run_torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "longtrain.train",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize(("method", "family"), [("ulysses", "qwen2"), ("ring", "llama")])
def test_sequence_parallel_losses_equal_one_process(tmp_path, hf_dirs, hf_corpus, method, family):
    common = [
        "model=hf",
        f"model.path={hf_dirs[family]}",
        *RUN,
        f"data.source=dir:{hf_corpus}",
        f"data.store_dir={tmp_path / 'store'}",
        "train.steps=4",
        "train.ckpt_final=false",
    ]
    one = train(load_config(common), tmp_path / "one")
    two = run_torchrun([*common, f"parallel={method}", f"hydra.run.dir={tmp_path / 'two'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"{method}=2" in two.stdout  # the layout line: the run really was parallel
    # float64: SP only reassociates attention sums (and the loss sum over ranks).
    assert read_losses(tmp_path / "two") == pytest.approx(read_losses(one), rel=1e-10)


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_under_fsdp2_follows_float64(tmp_path, hf_dirs, hf_corpus):
    """model=hf with model.dtype=bfloat16 over 2 processes (Ulysses 2, FSDP2 gathering bf16
    weights; longtrain.distributed.precision) trains along the float64 run of one process."""
    common = [
        "model=hf",
        f"model.path={hf_dirs['qwen2']}",
        *RUN,
        f"data.source=dir:{hf_corpus}",
        f"data.store_dir={tmp_path / 'store'}",
        "train.steps=3",
        "train.ckpt_final=false",
    ]
    exact = train(load_config(common), tmp_path / "f64")
    bf16 = [*common, "model.dtype=bfloat16", "model.attn_backend=auto", "model.kernel_backend=auto"]
    two = run_torchrun([*bf16, "parallel=ulysses", f"hydra.run.dir={tmp_path / 'bf16'}"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "FSDP2 gathers bf16" in two.stdout  # the precision line: the engine casts
    # bf16 keeps 8 mantissa bits: per-op rounding ~2^-9 relative, averaged over the step's
    # tokens; 2e-2 on losses of ~5.7 leaves room, while an untrained or diverged run is far off.
    assert read_losses(tmp_path / "bf16") == pytest.approx(read_losses(exact), rel=2e-2)
