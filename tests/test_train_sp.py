"""End to end under torchrun: every sequence-parallel layout trains with the per-step losses
of one process (float64, gloo, 4 processes). The data is chat data with a loss mask (plain
texts, conversations and prompt/completion pairs, `tests.fixtures.write_chat_corpus`), so
the mask's path through packing, the dp split and every SP layout is what is compared; and
with held-out documents evaluated every 3 steps, the evaluation (loss and loss by position)
too."""

from __future__ import annotations

import pytest

from longtrain.data.token_store import TokenStore
from tests.fixtures import write_chat_corpus
from tests.test_train import SMALL, read_metrics, run_cli

STEPS = 6  # two evaluations (steps 2 and 5) and enough steps for the curriculum to grow
LAYOUTS = {
    "ulysses4": ["parallel=ulysses"],
    "ring4-zigzag": ["parallel=ring"],
    "usp2x2": ["parallel=usp", "parallel.ulysses=2", "parallel.ring=2"],
    "dp2-ulysses2": ["parallel=ulysses", "parallel.ulysses=2"],
    "dp2-ring2-allgather": ["parallel=ring", "parallel.ring=2", "parallel.ring_impl=allgather"],
    # Adaptive placement (parallel/adaptive.py): documents up to 48 tokens whole on one rank.
    "usp2x2-adaptive": [
        "parallel=usp",
        "parallel.ulysses=2",
        "parallel.ring=2",
        "parallel.adaptive=true",
        "parallel.adaptive_threshold=48",
    ],
    "auto4": ["parallel=auto"],
}
ADAPTIVE = ("usp2x2-adaptive", "auto4")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("sp")
    corpus = write_chat_corpus(root / "chat.jsonl", num_records=80, seed=1)
    common = [
        *SMALL,
        f"data.source=jsonl:{corpus}",
        f"data.store_dir={root / 'store'}",
        "data.seq_len=128",
        "model.dtype=float64",
        f"train.steps={STEPS}",
        "train.ckpt_final=false",
        "data.val_fraction=0.15",
        "train.eval_every=3",
        "train.eval_sequences=4",
        "logging.plot=false",
    ]
    proc = run_cli([*common, f"hydra.run.dir={root / 'one'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = TokenStore.open(root / "store")
    # Masked: a third or so of the tokens train (assistant turns, completions, texts).
    assert store.loss_mask is not None and 0.1 < store.loss_mask.mean() < 0.9
    return root, common, read_metrics(root / "one")


def _split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training lines, evaluation lines) of a metrics.jsonl."""
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sp_layout_matches_one_process(single, layout):
    root, common, expected = single
    run_dir = root / layout
    proc = run_cli([*common, *LAYOUTS[layout], f"hydra.run.dir={run_dir}"], nproc=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (got, got_eval), (expected, expected_eval) = _split(read_metrics(run_dir)), _split(expected)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in expected]
    # float64: layouts differ only in how partial attention results and gradient sums are
    # reassociated (LSE merges, all-to-alls are exact), so per-step losses agree to ~1e-15;
    # 1e-9 is the contract DESIGN.md states.
    for a, b in zip(got, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9, abs=0)
    assert len(got) == STEPS
    if layout in ADAPTIVE:  # every token is either in a whole document or a split one
        for r in got:
            assert r["sp_local_tokens"] + r["sp_split_tokens"] == r["seqs"] * 128, r
            assert r["sp_method"] in ("local", "ring", "ulysses", "ring_allgather", "usp"), r
        assert any(r["sp_local_tokens"] > 0 for r in got)
    else:
        assert all(r["comm_bytes"] > 0 and r["comm_calls"] > 0 for r in got)
    # The held-out evaluation: the same tokens, the same losses (reassociation only).
    assert [r["step"] for r in got_eval] == [2, 5] == [r["step"] for r in expected_eval]
    for a, b in zip(got_eval, expected_eval):
        assert a["eval_tokens"] == b["eval_tokens"] > 0
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-9, abs=0)
        assert a["loss_by_position"].keys() == b["loss_by_position"].keys()
        for k, v in b["loss_by_position"].items():
            got_k = a["loss_by_position"][k]
            assert got_k == v if v is None else got_k == pytest.approx(v, rel=1e-9, abs=0), k


@pytest.mark.distributed
def test_variable_length_per_document_loss_is_layout_independent(single):
    root, common, _ = single
    variable = [*common, "data.packing=decomposition", "data.min_log2=4",
                "data.curriculum=grow_linear", "data.loss_weighting=per_document"]  # fmt: skip
    one = run_cli([*variable, f"hydra.run.dir={root / 'var-one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    four = run_cli([*variable, "parallel=ring", "parallel.ring=2",
                    f"hydra.run.dir={root / 'var-four'}"], nproc=4)  # fmt: skip
    assert four.returncode == 0, four.stderr[-4000:]
    a, b = _split(read_metrics(root / "var-one"))[0], _split(read_metrics(root / "var-four"))[0]
    assert len({r["seq_len"] for r in a}) > 1  # the shapes really vary
    assert [r["seq_len"] for r in a] == [r["seq_len"] for r in b]
    # Per-document weights are computed on the unsharded batch, so dp x sp only reassociates.
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-9, abs=0)
