"""Which store a run trains on (`longtrain.data.setup.resolve_token_store`): a user's store is
never silently replaced, by the embedded corpus or by another source, and an error on rank 0
reaches every rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longtrain.config import EMBEDDED_STORE_DIR, DataConfig
from longtrain.data.prepare import prepare
from longtrain.data.setup import resolve_token_store
from longtrain.distributed import DistEnv
from longtrain.errors import DataError
from longtrain.trainer.inputs import open_token_store
from tests.fixtures import write_text_corpus
from tests.spawn import spawn

ONE_PROCESS = DistEnv(rank=0, world_size=1, local_rank=0, device=None)


def _stamp(store_dir: Path) -> tuple[int, int]:
    st = (store_dir / "header.json").stat()
    return st.st_ino, st.st_mtime_ns


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_a_store_named_without_a_source_is_used_as_it_is(tmp_path, capsys):
    f = _jsonl(tmp_path / "c.jsonl", ["one", "two", "three"])
    out = tmp_path / "mine"
    prepare(f"jsonl:{f}", out, show_progress=False)
    stamp = _stamp(out)
    store = open_token_store(DataConfig(store_dir=str(out)), ONE_PROCESS)
    # Before: rebuilt from the default source (stdlib), the jsonl store gone.
    assert _stamp(out) == stamp and store.num_docs == 3
    assert store.header["meta"]["source"] == f"jsonl:{f}"
    line = capsys.readouterr().out.strip()
    assert line == f"token store {out}: built from jsonl:{f}, 3 docs, 14 tokens, tokenizer byte"


def test_no_store_and_no_source_names_the_fix(tmp_path):
    match = r"no token store at data\.store_dir=.*nowhere.*data\.source"
    with pytest.raises(DataError, match=match):
        resolve_token_store(DataConfig(store_dir=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no token store"):
        resolve_token_store(DataConfig(store_dir=str(tmp_path / "empty")))


def test_a_tokenizer_or_limit_that_the_store_contradicts_is_refused(tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", ["one", "two", "three"])
    out = tmp_path / "mine"
    prepare(f"jsonl:{f}", out, limit_docs=2, show_progress=False)
    stamp = _stamp(out)
    ok = resolve_token_store(DataConfig(store_dir=str(out), tokenizer="byte", limit_docs=2))
    assert ok.num_docs == 2
    with pytest.raises(DataError, match=r"data\.limit_docs=3 disagrees .* limit_docs 2\)"):
        resolve_token_store(DataConfig(store_dir=str(out), limit_docs=3))

    from tests.data.test_tokenizer import _build_hf_tokenizer

    tok = _build_hf_tokenizer(tmp_path / "tok")
    with pytest.raises(DataError, match=r"data\.tokenizer=.*tok' disagrees .*tokenizer 'byte'"):
        resolve_token_store(DataConfig(store_dir=str(out), tokenizer=str(tok)))
    assert _stamp(out) == stamp


def test_another_source_is_refused_unless_replace_store(tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", ["one", "two", "three"])
    corpus = write_text_corpus(tmp_path / "docs", num_docs=4)
    out = tmp_path / "mine"
    prepare(f"jsonl:{f}", out, show_progress=False)
    stamp = _stamp(out)
    cfg = DataConfig(source=f"dir:{corpus}", store_dir=str(out))
    with pytest.raises(DataError, match=rf"built from 'jsonl:{f}', not from 'dir:{corpus}'"):
        resolve_token_store(cfg)
    assert _stamp(out) == stamp
    cfg.replace_store = True
    assert resolve_token_store(cfg, show_progress=False).num_docs == 4


def test_same_source_reused_then_rebuilt_when_inputs_change(tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", ["one", "two"])
    out = tmp_path / "mine"
    cfg = DataConfig(source=f"jsonl:{f}", store_dir=str(out))
    resolve_token_store(cfg, show_progress=False)
    stamp = _stamp(out)
    assert resolve_token_store(cfg, show_progress=False).num_docs == 2
    assert _stamp(out) == stamp
    # The same file named another way is the same source.
    rel = DataConfig(source=f"jsonl:{tmp_path}/./c.jsonl", store_dir=str(out), limit_docs=1)
    assert resolve_token_store(rel, show_progress=False).num_docs == 1
    assert _stamp(out) != stamp


def test_stores_written_before_source_id_fall_back_to_the_spec(tmp_path):
    f = _jsonl(tmp_path / "c.jsonl", ["one", "two"])
    out = tmp_path / "mine"
    prepare(f"jsonl:{f}", out, show_progress=False)
    header = json.loads((out / "header.json").read_text())
    del header["meta"]["source_id"]
    (out / "header.json").write_text(json.dumps(header))
    stamp = _stamp(out)
    assert prepare(f"jsonl:{f}", out, show_progress=False).num_docs == 2
    assert _stamp(out) == stamp  # same spec: same source, same fingerprint: reused
    with pytest.raises(DataError, match="not from 'stdlib'"):
        prepare("stdlib", out, limit_docs=1, show_progress=False)


def test_the_embedded_store_is_built_from_stdlib_on_first_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = resolve_token_store(DataConfig(limit_docs=5), show_progress=False)
    assert store.path == Path(EMBEDDED_STORE_DIR) and store.num_docs == 5
    assert store.header["meta"]["source"] == "stdlib"
    # The same directory named another way is the embedded store too.
    again = DataConfig(store_dir=f"./{EMBEDDED_STORE_DIR}", limit_docs=5)
    assert resolve_token_store(again, show_progress=False).num_docs == 5


def _fail_on_rank0(rank: int, world_size: int, store_dir: str) -> str:
    env = DistEnv(rank=rank, world_size=world_size, local_rank=0, device=None)
    try:
        open_token_store(DataConfig(store_dir=store_dir), env)
    except DataError as e:
        return str(e)
    return "no error"


@pytest.mark.distributed
def test_an_error_on_rank0_reaches_every_rank(tmp_path):
    # Before: rank 0 raised before the barrier and rank 1 waited there until the timeout.
    messages = spawn(_fail_on_rank0, 2, str(tmp_path / "nowhere"), timeout=60)
    assert messages[0] == messages[1]
    assert "no token store" in messages[0] and "nowhere" in messages[0]


def test_the_planner_reads_an_empty_tokenizer_as_byte():
    # data.tokenizer now defaults to "" (the store's own; byte when building). Before: the
    # planner took "" for a Hugging Face tokenizer directory and failed to load it.
    from longtrain.config import RunConfig
    from longtrain.planner.simulate import _vocab_size

    assert _vocab_size(RunConfig()) == 259
