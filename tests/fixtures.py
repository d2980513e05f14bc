"""Small shared fixtures: a token store built from synthetic text in a temp directory."""

from __future__ import annotations

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


def make_store(tmp_path: Path, num_docs: int = 40, seed: int = 0) -> TokenStore:
    """Prepare (byte tokenizer) and open a token store under `tmp_path`."""
    corpus = write_text_corpus(tmp_path / "corpus", num_docs=num_docs, seed=seed)
    return prepare(f"dir:{corpus}", tmp_path / "store", tokenizer="byte", show_progress=False)
