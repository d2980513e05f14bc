"""model=hf from safetensors straight into the shards (`longtrain.model.hf_shards`, started by
`longtrain.distributed.meta_start`): one file or an index of several, float32 or bf16
files, one process or FSDP2 over two; the weights equal what `from_pretrained` loads, and a
directory that does not fit the model is one line before anything is copied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from longtrain.config import RunConfig
from longtrain.config.hf import hf_model_config
from longtrain.distributed import DistEnv
from longtrain.distributed.meta_start import build_parallel_model, starts_on_meta
from longtrain.distributed.parallelize import build_parallel_dims
from longtrain.model import build_model
from longtrain.model.hf_shards import HFWeightsError, load_hf_shards
from tests.hf_cases import F64, FAMILIES, save_hf_model
from tests.spawn import spawn

CPU = torch.device("cpu")


def _saved(tmp_path: Path, family: str, layout: str) -> Path:
    """A tiny random `family` model saved as one file, as an index of several files
    (`save_pretrained`'s max_shard_size), or as one bf16 file."""
    from transformers import AutoModelForCausalLM

    src = save_hf_model(FAMILIES[family](), tmp_path / "src")
    if layout == "single":
        return src
    model = AutoModelForCausalLM.from_pretrained(str(src))
    out = tmp_path / layout
    if layout == "indexed":
        model.save_pretrained(str(out), max_shard_size="20KB")
        assert (out / "model.safetensors.index.json").is_file()
    else:
        model.to(torch.bfloat16).save_pretrained(str(out))
    return out


def _run_config(path: Path, engine: str) -> RunConfig:
    cfg = RunConfig()
    cfg.model = hf_model_config(path, **F64)
    cfg.train.engine = engine
    return cfg


def _full_params(rank: int, world: int, paths: list[str]) -> list[tuple[dict, dict]]:
    """(full parameters, local rows) of the FSDP2 meta start of each model dir in turn."""
    out = []
    for path in paths:
        cfg = _run_config(Path(path), "fsdp2")
        env = DistEnv(rank, world, rank, CPU)
        model, _ = build_parallel_model(cfg, env, build_parallel_dims(cfg, env), pad_id=0)
        local = {n: p.to_local().shape[0] for n, p in model.named_parameters()}
        out.append(({n: p.full_tensor().clone() for n, p in model.named_parameters()}, local))
    return out


def _want(path: Path) -> dict:
    """What the whole-model path (`from_pretrained` on every rank) gives."""
    cfg = _run_config(path, "none")
    return dict(build_model(cfg.model, seed=0).named_parameters())


@pytest.mark.parametrize(
    ("family", "layout"), [("llama", "single"), ("qwen2", "indexed"), ("llama", "bf16")]
)
def test_one_process_loads_what_from_pretrained_loads(tmp_path, family, layout):
    path = _saved(tmp_path, family, layout)
    cfg = _run_config(path, "none")
    assert starts_on_meta(cfg)
    env = DistEnv(0, 1, 0, CPU)
    model, _ = build_parallel_model(cfg, env, build_parallel_dims(cfg, env), pad_id=0)
    want = _want(path)
    got = dict(model.named_parameters())
    assert got.keys() == want.keys()
    for name, p in want.items():
        assert torch.equal(got[name], p), name  # the same file values, the same casts
    # Buffers (the rotary tables) are computed, not left empty by the meta start.
    for (name, b), (_, c) in zip(model.named_buffers(), build_model(cfg.model, 0).named_buffers()):
        assert torch.equal(b, c), name
    # Qwen2 ties its output projection to the embedding: still one tensor.
    tied = model.hf.config.tie_word_embeddings
    assert (model.output_weight() is model.hf.get_input_embeddings().weight) == tied


@pytest.mark.distributed
def test_fsdp2_ranks_read_their_rows_and_hold_the_whole_model_between_them(tmp_path):
    # Qwen2 from an index: tied embeddings and several files, under sharding; and Qwen2
    # without weights: its own random init, drawn module by module into the shards.
    indexed = _saved(tmp_path, "qwen2", "indexed")
    config_only = _config_only(tmp_path, "qwen2")
    wants = [_want(indexed), _want(config_only)]
    for per_path in spawn(_full_params, 2, [str(indexed), str(config_only)], timeout=300):
        for (full, local), want in zip(per_path, wants):
            assert full.keys() == want.keys()
            for name, p in want.items():
                assert torch.equal(full[name], p), name  # the same draws, sliced
                assert local[name] <= -(-p.shape[0] // 2), name  # half the rows, rounded up


def _config_only(tmp_path: Path, family: str) -> Path:
    """A `family` model directory with config.json and no weights (model=hf random init)."""
    path = tmp_path / f"{family}_config_only"
    FAMILIES[family]().save_pretrained(str(path))
    return path


def test_random_init_is_the_models_own_and_a_meta_start_draws_the_same(tmp_path):
    path = _config_only(tmp_path, "qwen2")
    cfg = _run_config(path, "none")
    assert starts_on_meta(cfg)
    env = DistEnv(0, 1, 0, CPU)
    model, _ = build_parallel_model(cfg, env, build_parallel_dims(cfg, env), pad_id=0)
    want = _want(path)  # the whole-model build (DeepSpeed's path) from the same seed
    for name, p in model.named_parameters():
        assert torch.equal(p, want[name]), name
    # transformers' Qwen2 init: normal(0, initializer_range) matrices, zero biases, unit
    # norms; the tied output projection is the embedding.
    std = model.hf.config.initializer_range
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            # 1/sqrt(numel) is the spread of a sample std; 5 of them cannot fail by chance.
            assert abs(p.std().item() / std - 1) < 5 / p.numel() ** 0.5 + 0.02, name
    assert model.output_weight() is model.hf.get_input_embeddings().weight


def _model_on_meta_materialised(path: Path):
    cfg = _run_config(path, "none")
    model = build_model(cfg.model, seed=0, device="meta")
    model.to_empty(device=CPU)
    return model


def test_an_index_naming_a_missing_file_is_one_line(tmp_path):
    path = _saved(tmp_path, "llama", "indexed")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[-1]
    (path / gone).unlink()
    with pytest.raises(HFWeightsError, match=f"lacks.*{gone}"):
        load_hf_shards(_model_on_meta_materialised(path), path)


def _rewrite(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.__setitem__("model.norm.weight", torch.ones(7)), "has shape \\[7\\]"),
        (
            lambda t: t.__setitem__("model.norm.weight", torch.ones(32, dtype=torch.int32)),
            "is I32",
        ),
        (lambda t: t.pop("model.norm.weight"), "lack model.norm.weight"),
    ],
    ids=["shape", "dtype", "missing"],
)
def test_a_tensor_that_does_not_fit_is_one_line_and_nothing_is_copied(tmp_path, change, message):
    path = _saved(tmp_path, "llama", "single")
    _rewrite(path, change)
    model = _model_on_meta_materialised(path)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    with pytest.raises(HFWeightsError, match=message):
        load_hf_shards(model, path)
    assert all(bool((p == 7.0).all()) for p in model.parameters())
