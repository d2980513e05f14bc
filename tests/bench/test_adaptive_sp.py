"""bench/adaptive_sp.py's pieces that decide what it reports: the corpus mix and the goals
(the benchmark itself runs by hand: `python -m bench.adaptive_sp`)."""

from bench.adaptive_sp import communication_floors, corpus_sequences, goals


def test_corpus_sequences_fill_the_length_and_are_seeded():
    seqs = corpus_sequences(16384, 4)
    assert len(seqs) == 4 and all(sum(s) == 16384 and min(s) > 0 for s in seqs)
    assert seqs == corpus_sequences(16384, 4)
    assert seqs != corpus_sequences(16384, 4, seed=1)


def _row(tokens, P, mix, method, x_best, x_ulysses):
    return {"tokens": tokens, "P": P, "mix": mix, "method": method,
            "vs_best_fixed": x_best, "bytes_vs_ulysses": x_ulysses}  # fmt: skip


def test_goals_judge_the_64k_corpus_row_and_every_mix():
    rows = [_row(65536, 4, "corpus", "adaptive", 0.7, 0.4), _row(65536, 4, "long", "adaptive",
            1.04, 1.0), _row(65536, 4, "long", "ring", 1.0, 2.0)]  # fmt: skip
    assert [g["pass"] for g in goals(rows)] == [True, True, True]
    rows[1]["vs_best_fixed"] = 1.06  # the long mix 6% slower than the best fixed method
    assert [g["pass"] for g in goals(rows)] == [True, True, False]
    rows[0].update(vs_best_fixed=0.8, bytes_vs_ulysses=0.6)
    assert [g["pass"] for g in goals(rows)] == [False, False, False]
    assert goals(rows[1:])[0]["pass"] is None  # the 64K P=4 corpus row was not run


def test_communication_floor_is_the_best_fixed_methods_compute_share():
    rows = [
        {"tokens": 4096, "P": 2, "mix": "corpus", "method": "ring", "step_s": 2.0,
         "comm_share": 0.25},
        {"tokens": 4096, "P": 2, "mix": "corpus", "method": "ulysses", "step_s": 3.0,
         "comm_share": 0.5},
        {"tokens": 4096, "P": 2, "mix": "corpus", "method": "adaptive", "step_s": 1.0,
         "comm_share": 0.0},  # not a fixed method: never the reference
    ]  # fmt: skip
    (floor,) = communication_floors(rows)
    assert (floor["best_fixed"], floor["comm_share"], floor["floor"]) == ("ring", 0.25, 0.75)
