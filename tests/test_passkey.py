"""Passkey retrieval (`python -m longtrain.eval.passkey`): the prompt is what it says, the
scoring gives 1 to a model that always answers right and 0 to one that never does, and the
command writes passkey.json and passkey.png for a trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from longtrain.data.tokenizer import load_tokenizer
from longtrain.errors import DataError
from longtrain.eval.passkey import (
    FILLER,
    INTRO,
    NEEDLE,
    QUESTION,
    build_prompt,
    logits_scorer,
    main,
    run_passkey,
)
from longtrain.train import load_config, train
from tests.test_train import SMALL, data_overrides

TOK = load_tokenizer("byte")
VOCAB = 259


def _filler(n: int) -> np.ndarray:
    return np.tile(TOK.encode(FILLER), n // len(FILLER) + 1)[:n]


def _peeking(shift: int):
    """A stub model that sees the answer in the context: its most likely next token is the
    true one shifted by `shift` (0: always right; 1: never)."""

    def logits(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(positions), VOCAB)
        out[torch.arange(len(positions)), (tokens[positions + 1] + shift) % VOCAB] = 5.0
        return out

    return logits


@pytest.mark.parametrize(("shift", "accuracy"), [(0, 1.0), (1, 0.0)])
def test_a_model_that_always_answers_right_scores_one_and_one_that_never_does_zero(shift, accuracy):
    result = run_passkey(
        logits_scorer(_peeking(shift)), TOK, [300, 600], [0, 0.5, 1], 3, _filler(600)
    )
    assert result["accuracy"] == [[accuracy] * 3] * 2
    assert np.all(np.asarray(result["answer_loglik"]) < 0)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_prompt_has_its_length_the_key_at_its_depth_and_the_answer_last(depth):
    ids, answer_at = build_prompt(TOK, 400, depth, "12345", _filler(400))
    text = TOK.decode(ids)
    assert len(ids) == 400 and TOK.decode(ids[answer_at:]) == " 12345"
    # Byte tokens are characters: the filler before the needle is `depth` of all the filler.
    fixed = [INTRO, NEEDLE.format(key="12345"), QUESTION, " 12345"]
    room = 400 - sum(len(x.encode()) for x in fixed)
    assert text.index(NEEDLE.format(key="12345")) - len(INTRO) == round(depth * room)
    assert text.rstrip().endswith("What is the pass key? The pass key is 12345")


def test_a_length_too_short_for_the_prompt_is_one_line():
    with pytest.raises(DataError, match="the passkey prompt needs at least"):
        build_prompt(TOK, 50, 0.5, "12345", _filler(50))


def _sp_passkey(rank: int, world: int, run: str) -> dict:
    """Passkey of `run`'s checkpoint under Ulysses over `world` ranks (as under torchrun)."""
    from longtrain.convert.hf_export import load_run_config, resolve_checkpoint
    from longtrain.distributed import DistEnv
    from longtrain.eval.passkey import load_parallel_model, parallel_scorer

    run_dir, ckpt = resolve_checkpoint(run)
    cfg = load_run_config(run_dir)
    cfg.parallel.method, cfg.parallel.ulysses = "ulysses", world
    env = DistEnv(rank, world, rank, torch.device("cpu"))
    model, ctx, dp = load_parallel_model(ckpt, cfg, env, TOK.pad_id)
    return run_passkey(parallel_scorer(model, ctx, dp), TOK, LENGTHS, [0, 1], 2, _filler(320))


LENGTHS = [256, 320]


@pytest.mark.distributed
def test_the_command_writes_json_and_heatmap_and_sp_scores_alike(tmp_path, corpus, capsys):
    from tests.spawn import spawn

    run = tmp_path / "run"
    overrides = [*SMALL, *data_overrides(corpus, tmp_path / "store"), "model.dtype=float64"]
    train(load_config([*overrides, "train.steps=2"]), run)
    main([str(run), "--lengths", "256,320", "--depths", "0,1", "--trials", "2"])
    result = json.loads((run / "passkey.json").read_text())
    assert result["lengths"] == LENGTHS and result["depths"] == [0.0, 1.0]
    assert np.asarray(result["accuracy"]).shape == (2, 2)
    assert (run / "passkey.png").is_file()
    assert "passkey.json" in capsys.readouterr().out
    # The same prompts sharded over 2 Ulysses ranks, the checkpoint loaded into FSDP2 shards:
    # the same answers; float64 log-likelihoods up to reassociation (1e-9, DESIGN.md).
    for sp in spawn(_sp_passkey, 2, str(run), timeout=300):
        assert sp["accuracy"] == result["accuracy"]
        assert np.allclose(sp["answer_loglik"], result["answer_loglik"], rtol=1e-9, atol=0)
