"""Hugging Face safetensors weights read straight into this rank's shards.

`params_on_meta` builds a transformers model whose parameters have no storage (buffers such
as the rotary tables are computed as usual); once it is parallelised and sharded and its
parameters given storage (`to_empty`), `load_hf_shards` reads, for every parameter, only the
rows this rank holds (safetensors' sliced reads of a memory-mapped file), single-file or
indexed multi-file, in whatever float dtype the file has, converted to the parameter's. A
rank's host memory during the load is its shards plus one slice.

Every problem is found before a byte is copied: a shard file the index names but the
directory lacks, a tensor the model needs that no file has, a tensor of another shape or of
a dtype that is not a float.

Without weights (a random init), `init_hf_shards` runs transformers' own `_init_weights`
one module at a time on full-size stand-ins of that module's parameters and keeps this
rank's rows, so the init is the model's own, depends on the seed alone, and a rank holds
its shards plus one module's tensors.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from longtrain.model.sharded_init import copy_full_into, copy_rows_into, local_rows

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# safetensors dtype names of the float tensors a checkpoint may hold.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class HFWeightsError(ValueError):
    """Weights in a Hugging Face directory that do not fit the model; names the tensor or
    the file."""


@contextlib.contextmanager
def params_on_meta():
    """Inside, every parameter a module registers is created on the meta device (no
    storage); buffers are computed as usual."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        # One already on meta is registered as it is: tying (`lm_head.weight =
        # embed_tokens.weight`) must keep one object.
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def has_safetensors(path: str | Path) -> bool:
    """Whether `path` holds safetensors weights (one file or an index)."""
    return (Path(path) / SINGLE).is_file() or (Path(path) / INDEX).is_file()


def weight_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it. Raises HFWeightsError when the
    index names a file the directory lacks."""
    from safetensors import safe_open

    path = Path(path)
    if (path / INDEX).is_file():
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        files = {name: path / file for name, file in weight_map.items()}
        missing = sorted({f.name for f in files.values() if not f.is_file()})
        if missing:
            raise HFWeightsError(
                f"{path / INDEX} names {len(missing)} file(s) that {path} lacks (first: "
                f"{missing[0]}); download the whole checkpoint"
            )
        return files
    with safe_open(str(path / SINGLE), "pt") as f:
        return dict.fromkeys(f.keys(), path / SINGLE)


def _checked_files(model: nn.Module, path: Path, prefix: str) -> dict[Path, list[str]]:
    """File -> the parameter names it holds, after checking every tensor's presence, shape
    and dtype."""
    from safetensors import safe_open

    files = weight_files(path)
    wanted = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        key = name.removeprefix(prefix)
        if key not in files:
            raise HFWeightsError(
                f"the weights in {path} lack {key}, which the model needs; check that "
                "config.json matches them"
            )
        by_file.setdefault(files[key], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as f:
            for name in names:
                key = name.removeprefix(prefix)
                piece = f.get_slice(key)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                if shape != tuple(wanted[name].shape):
                    raise HFWeightsError(
                        f"{key} in {file} has shape {list(shape)}; the model needs "
                        f"{list(wanted[name].shape)} (config.json and the weights disagree)"
                    )
                if dtype not in FLOAT_DTYPES:
                    raise HFWeightsError(
                        f"{key} in {file} is {dtype}; weights must be float (F32, BF16, F16, F64)"
                    )
    return by_file


@torch.no_grad()
def load_hf_shards(model: nn.Module, path: str | Path, prefix: str = "hf.") -> None:
    """Fill every parameter of `model` (materialised, possibly sharded) from the safetensors
    weights in `path`, reading only the rows this rank holds. Parameter names are the
    file's under `prefix`. Raises HFWeightsError before copying anything when the files do
    not fit the model."""
    from safetensors import safe_open

    path = Path(path)
    by_file = _checked_files(model, path, prefix)
    params = dict(model.named_parameters())
    for file, names in by_file.items():
        with safe_open(str(file), "pt") as f:
            for name in names:
                param, key = params[name], name.removeprefix(prefix)
                rows = local_rows(param)
                if rows is None:
                    copy_full_into(param, f.get_tensor(key).to(param.dtype))
                elif rows[1] > rows[0]:
                    start, stop = rows
                    copy_rows_into(param, start, f.get_slice(key)[start:stop].to(param.dtype))


@torch.no_grad()
def init_hf_shards(hf_model: nn.Module, seed: int) -> None:
    """Fill every (materialised, possibly sharded) parameter of the transformers model
    `hf_model` with its own init (`hf_model._init_weights`) drawn from `seed`: modules in
    `modules()` order, each on full-size float32 stand-ins (so the draws are those of one
    process at any layout), this rank's part copied in. A parameter shared by two modules
    (tied embeddings) is drawn once, by the first. Raises HFWeightsError when the model's
    init leaves a parameter unset (one a modeling file sets only in its constructor)."""
    done: set[int] = set()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module_name, module in hf_model.named_modules():
            own = {n: p for n, p in module.named_parameters(recurse=False) if id(p) not in done}
            if not own:
                continue
            # NaN marks what the init did not write.
            stand_ins = {
                n: nn.Parameter(torch.full(p.shape, float("nan")), requires_grad=False)
                for n, p in own.items()
            }
            module._parameters.update(stand_ins)
            try:
                hf_model._init_weights(module)
            finally:
                module._parameters.update(own)
            for n, p in own.items():
                full = stand_ins[n].data
                if torch.isnan(full).any():
                    raise HFWeightsError(
                        f"model=hf random init: {type(hf_model).__name__}._init_weights "
                        f"leaves {module_name}.{n} unset; give model.path weights instead "
                        "(save_pretrained a model built with from_config)"
                    )
                copy_full_into(p, full.to(p.dtype))
                done.add(id(p))


__all__ = [
    "HFWeightsError",
    "has_safetensors",
    "init_hf_shards",
    "load_hf_shards",
    "params_on_meta",
    "weight_files",
]
