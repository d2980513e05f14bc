"""Export a longtrain model to a Hugging Face directory that `transformers` loads.

    python -m longtrain.convert.hf_export RUN_DIR_OR_CHECKPOINT OUT_DIR [--dtype bfloat16]

From a checkpoint the model is streamed one tensor at a time into files of at most
`--max-shard-gb` (default 5, as transformers) with `model.safetensors.index.json` when there
are several, so a model larger than host memory exports too.

Our `Transformer` is a Llama: it becomes `config.json` (a `LlamaConfig`) and the weights
under HF's names. RoPE needs no permutation: ours is the rotate-half convention with
inv_freq = theta^(-2i/E), which is what HF's Llama computes (its q/k weights are stored in
that layout, so they are copied as they are). Tied embeddings: no `lm_head.weight` and
`tie_word_embeddings: true`. A `model=hf` run keeps its own family, names and config.
`export_llama` and `export_hf_model` do the same for a model in memory.

The exported directory is also a valid `model=hf model.path=OUT_DIR`, so training can
continue in either form.

Nothing of the user's is overwritten: OUT_DIR must be new, empty, or an earlier export of ours,
which `longtrain_export.json` marks (it lists the files the export wrote). Re-exporting into
such a directory replaces those files; any other file there makes the export refuse, before the
checkpoint is even read.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from longtrain.config import RunConfig
from longtrain.errors import DataError, report_errors
from longtrain.model.hf import HFCausalLM
from longtrain.model.llama import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
EXPORT_MARKER = "longtrain_export.json"  # in an exported directory: the files the export wrote
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, 5 GB

# Our parameter names -> HF Llama's, per decoder layer.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(name: str) -> str:
    """The HF Llama name of our parameter `name` (e.g. layers.3.attn.wq.weight ->
    model.layers.3.self_attn.q_proj.weight). Raises KeyError for a name we do not map."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    prefix, index, rest = name.split(".", 2)
    if prefix != "layers" or rest not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return f"model.layers.{index}.{_LAYER_NAMES[rest]}"


def llama_config(
    model: Transformer,
    max_position_embeddings: int,
    dtype: torch.dtype,
    special_tokens: dict[str, int | None] | None = None,
):
    """The `transformers.LlamaConfig` describing `model`; `special_tokens` may give
    bos_token_id / eos_token_id / pad_token_id (default: none declared)."""
    from transformers import LlamaConfig

    cfg = model.cfg
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim or cfg.dim // cfg.n_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=cfg.init_std,
        dtype=str(dtype).removeprefix("torch."),
        architectures=["LlamaForCausalLM"],
        **{
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
            **(special_tokens or {}),
        },
    )


# --------------------------------------------------------------------------------------------
# The output directory: new, empty, or an earlier export of ours


def previous_export(out_dir: str | Path) -> list[str]:
    """The files an earlier export wrote into `out_dir` (none for a new or empty directory).

    Raises DataError when `out_dir` is not a directory, or holds anything that is neither one
    of those files nor the marker: the export must not replace or mix with a user's files."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return []
    if not out_dir.is_dir():
        raise DataError(f"export directory {out_dir} is a file: choose a new or empty directory")
    present = set(os.listdir(out_dir))
    if not present:
        return []
    ours: set[str] = set()
    if (out_dir / EXPORT_MARKER).is_file():
        try:
            ours = set(json.loads((out_dir / EXPORT_MARKER).read_text())["files"])
        except (ValueError, KeyError, TypeError) as err:  # a marker we did not write
            raise DataError(
                f"export directory {out_dir} has an unreadable {EXPORT_MARKER} ({err}): "
                "choose a new or empty directory"
            ) from err
    # A listed name that is now a directory is not ours either (we write files only).
    foreign = sorted(
        n for n in present - {EXPORT_MARKER} if n not in ours or (out_dir / n).is_dir()
    )
    if foreign:
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise DataError(
            f"export directory {out_dir} is not empty and holds files this exporter did not "
            f"write ({shown}): choose a new or empty directory (nothing was written)"
        )
    return sorted(ours & present)


def _begin_export(out_dir: Path) -> None:
    """Make `out_dir` ready for an export: created, or cleared of an earlier export's files."""
    stale = previous_export(out_dir)  # raises before anything is touched
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in stale:  # e.g. shards of a larger earlier export that this one would not replace
        (out_dir / name).unlink()


def _finish_export(out_dir: Path) -> None:
    """Write the marker: every file now in `out_dir` was written by this export."""
    files = sorted(n for n in os.listdir(out_dir) if n != EXPORT_MARKER)
    marker = {"exporter": "longtrain.convert.hf_export", "files": files}
    (out_dir / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def export_llama(
    model: Transformer,
    out_dir: str | Path,
    *,
    max_position_embeddings: int,
    dtype: torch.dtype | None = None,
    special_tokens: dict[str, int | None] | None = None,
) -> Path:
    """Write `model` to `out_dir` as a HF Llama (config.json + model.safetensors).

    `max_position_embeddings`: the context length to declare (the run's data.seq_len, say);
    `dtype`: of the stored weights (default: the model's); `special_tokens`: bos_token_id /
    eos_token_id / pad_token_id of the tokenizer the model was trained with. Returns `out_dir`.
    `out_dir` must be new, empty, or an earlier export (see `previous_export`).
    """
    from safetensors.torch import save_file

    if not isinstance(model, Transformer):
        raise TypeError(f"export_llama takes a longtrain Transformer, got {type(model).__name__}")
    dtype = dtype or model.embed.weight.dtype
    out_dir = Path(out_dir)
    _begin_export(out_dir)
    state = {
        hf_name(name): p.detach().to(device="cpu", dtype=dtype).contiguous()
        for name, p in model.named_parameters()  # a tied output is not a parameter of its own
    }
    config = llama_config(model, max_position_embeddings, dtype, special_tokens)
    config.save_pretrained(str(out_dir))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _finish_export(out_dir)
    return out_dir


def export_hf_model(model: HFCausalLM, out_dir: str | Path, dtype: torch.dtype | None = None):
    """Save a trained `model=hf` model with transformers' own `save_pretrained` (weights in
    `dtype`, default the model's; tied weights stay tied). The model itself is not changed.
    `out_dir` must be new, empty, or an earlier export (see `previous_export`)."""
    hf = model.hf
    out_dir = Path(out_dir)
    _begin_export(out_dir)
    dtype = dtype or model.output_weight().dtype
    converted: dict[int, torch.Tensor] = {}  # storage -> converted copy, so ties stay visible
    state = {}
    for name, t in hf.state_dict().items():
        if t.data_ptr() not in converted:
            converted[t.data_ptr()] = t.detach().to(device="cpu", dtype=dtype)
        state[name] = converted[t.data_ptr()]
    use_cache = hf.config.use_cache
    hf.config.use_cache = True  # we train without a KV cache; generation wants it back
    try:
        hf.save_pretrained(str(out_dir), state_dict=state)
    finally:
        hf.config.use_cache = use_cache
    # save_pretrained records the dtype of the model's parameters, not of the state we gave it.
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _finish_export(out_dir)
    return out_dir


# --------------------------------------------------------------------------------------------
# From a checkpoint on disk


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for a run directory (its newest checkpoint that
    passes verification, as `train.resume=auto` picks it) or a checkpoint directory
    `<run>/checkpoints/step_XXXXXXXX` (which must pass)."""
    from longtrain.distributed import single_process_env
    from longtrain.trainer.checkpoint import Checkpointer

    path = Path(path)
    if (path / "config.yaml").is_file():
        run_dir, resume = path, "auto"
    else:
        run_dir, resume = path.parent.parent, str(path)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{path} is neither a run directory (with config.yaml) nor a checkpoint "
                "inside one (<run>/checkpoints/step_XXXXXXXX)"
            )
    ckpt = Checkpointer(run_dir, single_process_env(), keep_last=0).resolve(resume)
    if ckpt is None:
        raise FileNotFoundError(f"{path} has no complete checkpoint under checkpoints/")
    return run_dir, ckpt


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run saved as `<run_dir>/config.yaml`."""
    saved = OmegaConf.load(Path(run_dir) / "config.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), saved))


def load_checkpoint_model(path: str | Path) -> tuple[torch.nn.Module, RunConfig]:
    """The model of a run's checkpoint (see `resolve_checkpoint`), on CPU, with its run config.
    Works in a single process without a process group, whatever layout the run used."""
    import torch.distributed.checkpoint as dcp

    from longtrain.model import build_model

    run_dir, ckpt = resolve_checkpoint(path)
    cfg = load_run_config(run_dir)
    model = build_model(cfg.model, seed=cfg.train.seed)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state["model"])
    return model, cfg


def export_checkpoint(
    path: str | Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Export the model of a checkpoint (or of a run's newest one) to `out_dir`, which must be
    new, empty, or an earlier export (checked before the checkpoint is read).

    The model is streamed (`stream_export`): one tensor read from the checkpoint at a time,
    files of at most `max_shard_bytes` with an index when there are several, so the export
    never holds the whole model, ours or a model=hf one."""
    previous_export(out_dir)
    run_dir, ckpt = resolve_checkpoint(path)
    return stream_export(load_run_config(run_dir), ckpt, out_dir, dtype, max_shard_bytes)


def _shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most `max_shard_bytes` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def stream_export(
    cfg: RunConfig,
    ckpt: Path,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Export the model of checkpoint `ckpt` (run config `cfg`), reading one tensor at a time
    from the DCP checkpoint (whatever layout wrote it) into files of at most
    `max_shard_bytes`: `model.safetensors`, or `model-0000i-of-0000n.safetensors` with
    `model.safetensors.index.json` (HF's names and format). Our model becomes a HF Llama; a
    model=hf run keeps its own family, names and config (tied weights stored once, as
    `save_pretrained` does). Memory: one file's tensors."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from longtrain.model import build_model

    model = build_model(cfg.model, seed=cfg.train.seed, device="meta")  # names and shapes
    # A tied output projection is listed once, under the embedding's name.
    params = dict(model.named_parameters())
    dtype = dtype or next(iter(params.values())).dtype
    if isinstance(model, HFCausalLM):
        names = {name: name.removeprefix("hf.") for name in params}
        config = _trained_hf_config(model, dtype)
    else:
        names = {name: hf_name(name) for name in params}
        tokens = store_special_tokens(cfg.data.store_dir)
        config = llama_config(model, cfg.data.seq_len, dtype, tokens)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {name: p.numel() * itemsize for name, p in params.items()}
    shards = _shard_plan(sizes, max_shard_bytes)
    out_dir = Path(out_dir)
    _begin_export(out_dir)
    config.save_pretrained(str(out_dir))
    weight_map = {}
    for i, shard in enumerate(shards):
        file = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        state = {}
        for name in shard:
            p = params[name]
            full = torch.empty(p.shape, dtype=p.dtype)
            dcp.load({"model": {name: full}}, checkpoint_id=str(ckpt))  # DCP reads its pieces
            state[names[name]] = full.to(dtype).contiguous()
            weight_map[names[name]] = file
        save_file(state, str(out_dir / file), metadata={"format": "pt"})
        del state
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _finish_export(out_dir)
    return out_dir


def _trained_hf_config(model: HFCausalLM, dtype: torch.dtype):
    """The transformers config of a model=hf run as an export declares it: the stored dtype,
    and the KV cache (off while training) back on for generation."""
    import copy

    config = copy.deepcopy(model.hf.config)
    config.use_cache = True
    config.dtype = dtype
    return config


def store_special_tokens(store_dir: str | Path) -> dict[str, int | None]:
    """bos/eos/pad ids of the token store the run trained on (none if it is gone)."""
    from longtrain.data.token_store import TokenStore

    try:
        store = TokenStore.open(store_dir, check_tokens=False)
    except (FileNotFoundError, ValueError):
        return {}
    return {
        "bos_token_id": store.bos_id,
        "eos_token_id": store.eos_id,
        "pad_token_id": store.pad_id,
    }


def main(argv: list[str] | None = None) -> None:
    """The `python -m longtrain.convert.hf_export` command: a user error is one line, exit 2."""
    parser = argparse.ArgumentParser(
        prog="python -m longtrain.convert.hf_export",
        description="Export a longtrain checkpoint to a Hugging Face model directory.",
    )
    parser.add_argument("checkpoint", help="run directory (newest checkpoint) or checkpoint dir")
    parser.add_argument(
        "out_dir",
        help="new or empty directory (or an earlier export) for config.json + model.safetensors",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="stored dtype")
    parser.add_argument(
        "--max-shard-gb",
        type=float,
        default=DEFAULT_SHARD_BYTES / 1e9,
        help="largest safetensors file, GB (several files get an index)",
    )
    args = parser.parse_args(argv)
    if not args.max_shard_gb > 0:
        parser.error(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")

    def run() -> Path:
        return export_checkpoint(
            args.checkpoint, args.out_dir, DTYPES.get(args.dtype), int(args.max_shard_gb * 1e9)
        )

    out = report_errors("longtrain.convert.hf_export", run)
    print(f"exported {args.checkpoint} -> {out}")


if __name__ == "__main__":
    main()

__all__ = [
    "EXPORT_MARKER",
    "export_checkpoint",
    "export_hf_model",
    "export_llama",
    "hf_name",
    "llama_config",
    "load_checkpoint_model",
    "load_run_config",
    "stream_export",
    "previous_export",
    "resolve_checkpoint",
]
