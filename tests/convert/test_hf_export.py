"""Export to Hugging Face (longtrain/convert/hf_export.py): our Transformer as a Llama that
transformers loads with equal logits, a trained checkpoint's export against the run's own
losses, and an export that never replaces a user's files. float64 on CPU; where transformers
rounds to float32 inside (RMSNorm, RoPE), the tolerance says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open

from longtrain.config import ModelConfig
from longtrain.convert.hf_export import EXPORT_MARKER, export_llama, hf_name, main
from longtrain.data.token_store import TokenStore
from longtrain.errors import DataError
from longtrain.model import build_model
from longtrain.train import load_config, train
from tests.hf_cases import (
    F64,
    REPO,
    RUN,
    packed,
    random_docs,
    read_losses,
    reference_loss_sum,
    reference_model,
    step_batch,
)


def tiny_transformer(tie: bool) -> torch.nn.Module:
    cfg = ModelConfig(
        vocab_size=61,
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        rope_theta=5e5,
        norm_eps=1e-5,
        tie_embeddings=tie,
        **F64,
    )
    return build_model(cfg, seed=1)


# transformers computes RoPE angles and RMSNorm statistics in float32 even in float64 models:
# relative errors of order 2^-24 ~ 6e-8 per op, a few ops over 2 layers; logits are O(1).
# A mapping or RoPE-layout error would show as O(1e-1) differences.
HF_FLOAT32_INSIDE = dict(rtol=0, atol=2e-6)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_round_trip(tmp_path, tie):
    model = tiny_transformer(tie)
    out = export_llama(model, tmp_path / "hf", max_position_embeddings=64)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    expected = {hf_name(n) for n, _ in model.named_parameters()}
    assert keys == expected and ("lm_head.weight" in keys) == (not tie)

    ref = reference_model(out)  # transformers loads it as a plain Llama
    assert ref.config.tie_word_embeddings == tie
    docs = random_docs([13, 40], seed=4)
    docs = [d % 61 for d in docs]
    for doc in docs:
        _, _, positions, meta = packed([doc])
        ours = model.logits(model(doc, positions, meta))
        theirs = ref(input_ids=doc[None]).logits[0]
        torch.testing.assert_close(ours, theirs, **HF_FLOAT32_INSIDE)

    # Import: model=hf from the exported directory holds exactly our weights...
    back = build_model(load_config(["model=hf", f"model.path={out}", *RUN[:3]]).model, seed=0)
    ours_params = {hf_name(n): p for n, p in model.named_parameters()}
    for name, p in back.hf.named_parameters():
        assert torch.equal(p, ours_params[name]), name
    # ...and gives transformers' logits on a packed batch (same modules: float64 exact).
    tokens, _, positions, meta = packed(docs)
    hidden = back(tokens, positions, meta)
    theirs = torch.cat([ref(input_ids=d[None]).logits[0] for d in docs])
    torch.testing.assert_close(back.logits(hidden), theirs, rtol=1e-12, atol=1e-12)


def test_export_never_replaces_a_users_files(tmp_path):
    model = tiny_transformer(tie=False)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(DataError) as err:
        export_llama(model, mine, max_position_embeddings=64)
    assert str(err.value) == (
        f"export directory {mine} is not empty and holds files this exporter did not write "
        "(notes.txt): choose a new or empty directory (nothing was written)"
    )
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"
    with pytest.raises(DataError, match="notes.txt is a file: choose a new or empty directory"):
        export_llama(model, mine / "notes.txt", max_position_embeddings=64)

    # Its own earlier export may be replaced: the marker lists what it wrote.
    out = export_llama(model, tmp_path / "hf", max_position_embeddings=64)
    written = json.loads((out / EXPORT_MARKER).read_text())["files"]
    assert written == ["config.json", "model.safetensors"]
    # An earlier export's file that this one does not write (a shard, say) does not linger.
    (out / "model-00002-of-00002.safetensors").write_bytes(b"old")
    marker = {"files": [*written, "model-00002-of-00002.safetensors"]}
    (out / EXPORT_MARKER).write_text(json.dumps(marker))
    export_llama(tiny_transformer(tie=True), out, max_position_embeddings=64)
    assert sorted(os.listdir(out)) == ["config.json", EXPORT_MARKER, "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True

    # A file of the user's beside an export (a tokenizer, say): refused, nothing touched.
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(DataError, match=r"\(tokenizer.json\): choose a new or empty directory"):
        export_llama(model, out, max_position_embeddings=64)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_export_command_errors_are_one_line(tmp_path):
    """A missing checkpoint: one line and exit status 2, not a traceback; nothing created."""
    missing, out = tmp_path / "no_run", tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "longtrain.convert.hf_export", str(missing), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        f"longtrain.convert.hf_export: error: {missing} is neither a run directory (with "
        "config.yaml) nor a checkpoint inside one (<run>/checkpoints/step_XXXXXXXX)"
    ]
    assert not out.exists()


def test_export_of_a_trained_checkpoint(tmp_path, hf_corpus, capsys):
    common = [
        "model.dim=32",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_dim=64",
        "model.tie_embeddings=true",
        *RUN,
        f"data.source=dir:{hf_corpus}",
        f"data.store_dir={tmp_path / 'store'}",
    ]
    run_dir = train(
        load_config([*common, "train.steps=3", "train.ckpt_every=2", "train.keep_last=0"]),
        tmp_path / "run",
    )
    checkpoint = str(run_dir / "checkpoints" / "step_00000002")
    # A directory of the user's is refused before the checkpoint is read: one line, status 2.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("mine")
    capsys.readouterr()  # the run's own output
    with pytest.raises(SystemExit) as exited:
        main([checkpoint, str(tmp_path / "mine")])
    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"longtrain.convert.hf_export: error: export directory {tmp_path / 'mine'} is not empty "
        "and holds files this exporter did not write (README.md): choose a new or empty "
        "directory (nothing was written)"
    ]
    assert os.listdir(tmp_path / "mine") == ["README.md"]
    main([checkpoint, str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    store = TokenStore.open(tmp_path / "store")
    assert (config["eos_token_id"], config["pad_token_id"]) == (store.eos_id, store.pad_id)
    ref = reference_model(tmp_path / "hf")
    mb2 = step_batch(run_dir, 2)
    # The run's step-2 loss (our float64 model) against transformers with the exported
    # weights; HF's float32 RoPE/RMSNorm give ~1e-7 relative (see HF_FLOAT32_INSIDE).
    loss = (reference_loss_sum(ref, mb2) / mb2.num_trained()).item()
    assert loss == pytest.approx(read_losses(run_dir)[2], rel=1e-6)
    # The same checkpoint streamed into files of at most 20 KB: an index and several files,
    # the same tensors, and transformers loads them into the same model.
    main([checkpoint, str(tmp_path / "sharded"), "--max-shard-gb", "0.00002"])
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as whole:
        assert set(index["weight_map"]) == set(whole.keys())
        for name, file in index["weight_map"].items():
            with safe_open(str(tmp_path / "sharded" / file), "pt") as part:
                assert torch.equal(part.get_tensor(name), whole.get_tensor(name)), name
    sharded = reference_model(tmp_path / "sharded")
    assert (reference_loss_sum(sharded, mb2) / mb2.num_trained()).item() == loss
