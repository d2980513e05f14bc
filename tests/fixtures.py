"""Small shared fixtures: a token store built from synthetic text in a temp directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from longtrain.data.prepare import prepare
from longtrain.data.token_store import TokenStore


def write_text_corpus(root: Path, num_docs: int = 40, seed: int = 0) -> Path:
    """A directory of `num_docs` .txt files with heavy-tailed lengths (a few bytes to ~3 KB),
    made of repeated English-like words so a small model can learn something quickly."""
    rng = np.random.default_rng(seed)
    words = np.array(
        ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was"]
        + ["on", "be", "by", "this", "are", "from", "at", "or"]
    )
    root.mkdir(parents=True, exist_ok=True)
    for i in range(num_docs):
        n_words = int(min(600, rng.lognormal(mean=3.5, sigma=1.0))) + 1
        text = " ".join(rng.choice(words, size=n_words))
        (root / f"doc_{i:04d}.txt").write_text(text + "\n")
    return root


def write_chat_corpus(path: Path, num_records: int = 80, seed: int = 0) -> Path:
    """A .jsonl file mixing the record formats of `longtrain.data.chat`: plain texts,
    conversations of 1-4 exchanges (some with a system message), and prompt/completion pairs;
    lengths heavy-tailed, some prompts far longer than their answers, so that packing cuts
    documents and leaves chunks with no trained token at all."""
    rng = np.random.default_rng(seed)
    words = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was"]

    def text(scale: float) -> str:
        return " ".join(rng.choice(words, size=int(min(400, rng.lognormal(scale, 1.0))) + 1))

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(num_records):
        kind = rng.choice(["text", "chat", "prompt"], p=[0.25, 0.5, 0.25])
        if kind == "text":
            record: dict = {"text": text(3.0)}
        elif kind == "chat":
            messages = [{"role": "system", "content": text(1.5)}] if rng.random() < 0.3 else []
            for _ in range(int(rng.integers(1, 5))):
                messages.append({"role": "user", "content": text(3.0)})
                messages.append({"role": "assistant", "content": text(2.0)})
            record = {"messages": messages}
        else:
            record = {"prompt": text(3.5), "completion": text(1.5)}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_store(tmp_path: Path, num_docs: int = 40, seed: int = 0) -> TokenStore:
    """Prepare (byte tokenizer) and open a token store under `tmp_path`."""
    corpus = write_text_corpus(tmp_path / "corpus", num_docs=num_docs, seed=seed)
    return prepare(f"dir:{corpus}", tmp_path / "store", tokenizer="byte", show_progress=False)
