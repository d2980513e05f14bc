"""Shared pieces of the Hugging Face tests (tests/model/test_hf.py, tests/convert/): tiny
random-weight Llama, Qwen2 and Mistral configs, transformers' own float64 reference, packed
batches and the batches a run trained on. Import after `pytest.importorskip("transformers")`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from kernels.attention import VarlenMeta
from longtrain.data.batch import IGNORE_INDEX, PackedBatch
from longtrain.data.setup import build_loader
from longtrain.data.token_store import TokenStore

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300  # > the byte tokenizer's 259 ids, so the test corpora fit
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
FAMILIES = {
    "llama": lambda: LlamaConfig(
        **TINY, rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    ),
    # Qwen2: q/k/v biases and tied embeddings, as its small checkpoints have.
    "qwen2": lambda: Qwen2Config(**TINY, tie_word_embeddings=True),
    # Mistral: a sliding window (4096) that the test documents never reach.
    "mistral": lambda: MistralConfig(**TINY, sliding_window=4096),
}
F64 = dict(dtype="float64", attn_backend="torch", kernel_backend="torch")
RUN = [
    "model.dtype=float64",
    "model.attn_backend=torch",
    "model.kernel_backend=torch",
    "data.seq_len=64",
    "train.global_batch=4",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
    "optim.lr=1e-2",
    "logging.wandb.mode=disabled",
    "logging.progress=false",
    "logging.plot=false",
]


def save_hf_model(config, path: Path, seed: int = 0) -> Path:
    """A random-weight transformers model of `config`, saved (config.json + safetensors)."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return path


def reference_model(path: Path):
    """transformers' own model of `path` in float64 with its exact (`sdpa`) attention."""
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float64, attn_implementation="sdpa"
    )


def packed(docs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(tokens, labels, position_ids, meta) of `docs` packed end to end; labels are the next
    token of the same document (IGNORE_INDEX at each document's end)."""
    tokens = torch.cat(docs)
    labels = torch.cat([torch.cat([d[1:], torch.tensor([IGNORE_INDEX])]) for d in docs])
    positions = torch.cat([torch.arange(len(d)) for d in docs])
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([len(d) for d in docs]), 0)
    longest = max(len(d) for d in docs)
    return tokens, labels, positions, VarlenMeta(cu, cu, longest, longest)


def random_docs(lengths: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in lengths]


def reference_loss_sum(ref, mb: PackedBatch) -> torch.Tensor:
    """Sum of token cross-entropies of a PackedBatch, each segment alone through `ref` with
    its own (default) positions, against the batch's labels; float64 throughout."""
    total = torch.zeros((), dtype=torch.float64)
    bounds = mb.cu_seqlens.tolist()
    for a, b, pad in zip(bounds[:-1], bounds[1:], mb.segment_is_padding.tolist()):
        if pad:
            continue
        logits = ref(input_ids=mb.tokens[None, a:b]).logits[0]
        total += F.cross_entropy(logits, mb.labels[a:b], ignore_index=IGNORE_INDEX, reduction="sum")
    return total


def read_losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def step_batch(run_dir: Path, step: int) -> PackedBatch:
    """The (single) micro-batch that a one-process run of `run_dir` trained on at `step`."""
    from longtrain.convert.hf_export import load_run_config

    cfg = load_run_config(run_dir)
    store = TokenStore.open(cfg.data.store_dir)
    loader = build_loader(store, cfg, dp_rank=0, dp_size=1)
    (mb,) = loader.batches_for_step(step).micro_batches
    return mb
