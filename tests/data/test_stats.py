"""`python -m longtrain.data.stats`: the side-by-side packer table."""

import numpy as np

from longtrain.data.stats import main, packer_stats
from tests.fixtures import make_store


def test_rows_account_for_every_token():
    lengths = np.array([5, 300, 64, 1000, 7, 129])
    rows = {r["packer"].split("[")[0]: r for r in packer_stats(lengths, seq_len=256, min_log2=2)}
    total = int(lengths.sum())
    cc, bf, dec = rows["concat_chunk"], rows["best_fit"], rows["decomposition"]
    assert cc["sequences"] == -(-total // 256)  # ceil: concat-chunk never wastes a sequence
    assert bf["truncated_docs"] == 2  # only the documents longer than 256 (300, 1000)
    assert dec["padding_pct"] == 0.0
    # Pieces below 2^2 are dropped: 5 = 4 + (1), 7 = 4 + (2 + 1), 129 = 128 + (1).
    assert dec["dropped_tokens"] == 1 + 3 + 1
    # Best-fit keeps documents whole where concat-chunk cuts them: more context per token.
    assert bf["avg_context"] > cc["avg_context"]


def test_cli_prints_a_table(tmp_path, capsys):
    store = make_store(tmp_path, num_docs=20)
    main(["--store", str(store.path), "--seq-len", "256", "--json", str(tmp_path / "s.json")])
    out = capsys.readouterr().out
    assert "best_fit" in out and "decomposition" in out and "pad %" in out
    assert (tmp_path / "s.json").stat().st_size > 0
