"""Passkey retrieval: does the model find a number hidden at some depth of a long context?

    python -m longtrain.eval.passkey RUN_DIR_OR_CHECKPOINT --lengths 256,1024,4096 \\
        --depths 0,0.25,0.5,0.75,1 [--trials 3] [--filler corpus] [--out DIR]

The prompt is the one LWM and EasyContext report with: an instruction, filler text (a
repeated sentence, or `--filler corpus`: the run's own token store, read in order), and at
a fraction `depth` of it the sentence "The pass key is KEY. Remember it. KEY is the pass
key.", then "What is the pass key? The pass key is" followed by the answer " KEY". The
prompt is `length` tokens long (answer included), cut from the filler to fit.

Scoring is greedy decoding's, in one forward: with the right answer in the context, the
model is right when at every answer position its most likely next token is the answer's
(teacher forcing; that is exactly when greedy decoding would produce the whole answer). The
answer's log-likelihood is kept too. Each (length, depth) cell is the accuracy over
`--trials` random 5-digit keys (seeded by --seed).

Writes `passkey.json` (lengths, depths, accuracy[length][depth], mean log-likelihood, the
settings) and `passkey.png` (a heatmap) into the run directory, or `--out DIR`. In one
process the model is whole on one device (`--device`). Under torchrun (lengths one device
cannot hold) the model is built and sharded as for training (FSDP2, sequence parallelism
from the run's config or `--parallel/--ulysses/--ring`), the checkpoint loaded into the
shards, and each prompt sharded over the SP ranks as a training sequence is; the argmax
and the answer's loss are read inside the forward (`longtrain.trainer.step.forward_token_losses`).
A model=hf run works the same way.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from longtrain.errors import DataError, report_errors

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n"
)
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER = " {key}"

# next_token_logits(tokens [T] int64, positions [K] int64) -> logits [K, V] of the token after
# each position (the model sees all of `tokens`: teacher forcing).
NextTokenLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# scorer(prompt ids [T], index of the answer's first token) -> (right, answer log-likelihood)
Scorer = Callable[[np.ndarray, int], tuple[bool, float]]


def build_prompt(
    tok, length: int, depth: float, key: str, filler_ids: np.ndarray
) -> tuple[np.ndarray, int]:
    """(ids [length] int64, index of the answer's first token) of one passkey prompt: filler
    cut to make `length` tokens in all, the needle at fraction `depth` of the filler."""
    intro, needle = tok.encode(INTRO), tok.encode(NEEDLE.format(key=key))
    question, answer = tok.encode(QUESTION), tok.encode(ANSWER.format(key=key))
    room = length - len(intro) - len(needle) - len(question) - len(answer)
    if room < 0:
        raise DataError(
            f"--lengths {length}: the passkey prompt needs at least "
            f"{length - room} tokens without filler"
        )
    if len(filler_ids) < room:
        raise DataError(f"the filler has {len(filler_ids)} tokens, {room} are needed")
    at = int(round(depth * room))
    parts = [intro, filler_ids[:at], needle, filler_ids[at:room], question, answer]
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    return ids, length - len(answer)


def score(
    next_token_logits: NextTokenLogits, ids: np.ndarray, answer_at: int
) -> tuple[bool, float]:
    """(greedy decoding gets the whole answer right, log-likelihood of the answer) for a
    prompt whose answer starts at `answer_at` (see the module doc)."""
    tokens = torch.as_tensor(ids, dtype=torch.int64)
    positions = torch.arange(answer_at - 1, len(ids) - 1)  # each predicts the next token
    logits = next_token_logits(tokens, positions).double()
    targets = tokens[answer_at:]
    right = bool((logits.argmax(dim=-1) == targets).all())
    loglik = float(torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum())
    return right, loglik


def logits_scorer(next_token_logits: NextTokenLogits) -> Scorer:
    """The `Scorer` of a model given as `NextTokenLogits` (one process, or a stub)."""
    return lambda ids, answer_at: score(next_token_logits, ids, answer_at)


def parallel_scorer(model: torch.nn.Module, ctx, dp_size: int) -> Scorer:
    """The `Scorer` of a parallelised model (collective: every rank scores every prompt).
    The prompt is one packed sequence whose answer tokens are its only labels, sharded by
    the run's layout; each rank reads its tokens' argmax and loss from the forward, and the
    counts are summed over all ranks (each token on one rank per data-parallel replica)."""
    from longtrain.data.batch import IGNORE_INDEX, PackedBatch
    from longtrain.distributed import all_reduce_sum
    from longtrain.trainer.step import forward_token_losses, shard_micro_batch

    def scorer(ids: np.ndarray, answer_at: int) -> tuple[bool, float]:
        n = len(ids)
        tokens = torch.as_tensor(ids, dtype=torch.int64)
        labels = torch.full((n,), IGNORE_INDEX, dtype=torch.int64)
        labels[answer_at - 1 : n - 1] = tokens[answer_at:]
        mb = PackedBatch(
            tokens=tokens,
            labels=labels,
            position_ids=torch.arange(n),
            cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
            loss_weights=(labels != IGNORE_INDEX).double(),
            segment_is_padding=torch.tensor([False]),
            num_sequences=1,
            num_docs=1,
            num_padding=0,
        )
        local = shard_micro_batch(mb, ctx)
        ce_T, argmax_T = forward_token_losses(model, local, ctx)
        trained = local.labels != IGNORE_INDEX
        wrong = (argmax_T[trained] != local.labels[trained]).sum()
        loss = ce_T[trained].sum()
        sums = torch.stack([wrong.double(), loss.double()]).to(ctx.device)
        all_reduce_sum(sums, ctx.world_group)
        return bool(sums[0].item() == 0), -float(sums[1].item()) / dp_size

    return scorer


def model_next_token_logits(model: torch.nn.Module, device: torch.device) -> NextTokenLogits:
    """`NextTokenLogits` of a longtrain model (ours or model=hf), one segment, no labels."""
    from kernels.attention import VarlenMeta

    def logits(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        n = tokens.numel()
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        meta = VarlenMeta(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n)
        with torch.no_grad():
            hidden_TE = model(tokens.to(device), torch.arange(n, device=device), meta)
            return model.logits(hidden_TE[positions.to(device)]).float().cpu()

    return logits


def run_passkey(
    scorer: Scorer,
    tok,
    lengths: list[int],
    depths: list[float],
    trials: int,
    filler_ids: np.ndarray,
    seed: int = 0,
) -> dict:
    """The passkey table: accuracy[i][j] over `trials` keys at lengths[i], depths[j], and the
    mean answer log-likelihood alike (`scorer`: `logits_scorer` or `parallel_scorer`)."""
    rng = np.random.default_rng(seed)
    accuracy, loglik = [], []
    for length in lengths:
        acc_row, ll_row = [], []
        for depth in depths:
            results = []
            for _ in range(trials):
                key = str(int(rng.integers(10_000, 100_000)))
                ids, answer_at = build_prompt(tok, length, depth, key, filler_ids)
                results.append(scorer(ids, answer_at))
            acc_row.append(sum(r for r, _ in results) / trials)
            ll_row.append(sum(ll for _, ll in results) / trials)
        accuracy.append(acc_row)
        loglik.append(ll_row)
    return {"lengths": lengths, "depths": depths, "trials": trials, "accuracy": accuracy,
            "answer_loglik": loglik}  # fmt: skip


def plot_passkey(result: dict, png_path: Path, title: str = "") -> Path:
    """A heatmap of accuracy: depth (rows) by context length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = np.asarray(result["accuracy"], dtype=float).T  # [depth, length]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * acc.shape[1], 1.2 + 0.6 * acc.shape[0]))
    image = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(acc.shape[1]), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(acc.shape[0]), [f"{d:g}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the key")
    for (i, j), value in np.ndenumerate(acc):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title or "passkey retrieval")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)


def _filler(kind: str, tok, cfg, total: int) -> np.ndarray:
    """`total` filler tokens: the repeated sentence, or the run's token store in order."""
    if kind == "sentence":
        one = tok.encode(FILLER)
        return np.tile(one, total // len(one) + 1)[:total]
    from longtrain.data.token_store import TokenStore

    store = TokenStore.open(cfg.data.store_dir, check_tokens=False)
    if store.num_tokens < total:
        raise DataError(f"the token store at {cfg.data.store_dir} has fewer than {total} tokens")
    return np.asarray(store.tokens[:total], dtype=np.int64)


def _tokenizer(cfg):
    from longtrain.data.token_store import TokenStore
    from longtrain.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(
            TokenStore.open(cfg.data.store_dir, check_tokens=False).tokenizer_spec
        )
    except (FileNotFoundError, ValueError):
        return load_tokenizer(cfg.data.tokenizer or "byte")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    """The `python -m longtrain.eval.passkey` command: a user error is one line, status 2."""
    parser = argparse.ArgumentParser(
        prog="python -m longtrain.eval.passkey",
        description="Passkey retrieval accuracy of a run's checkpoint, by length and depth.",
    )
    parser.add_argument("checkpoint", help="run directory (newest checkpoint) or checkpoint dir")
    parser.add_argument("--lengths", default="256,512,1024", help="prompt lengths, tokens")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="key depths in [0, 1]")
    parser.add_argument("--trials", type=int, default=3, help="random keys per cell")
    parser.add_argument("--filler", choices=("sentence", "corpus"), default="sentence")
    parser.add_argument("--seed", type=int, default=0, help="seeds the keys")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="directory for passkey.json/png")
    parser.add_argument(
        "--parallel", choices=("none", "ulysses", "ring", "usp"), default=None,
        help="under torchrun: the SP method (default: the run's)",
    )  # fmt: skip
    parser.add_argument("--ulysses", type=int, default=None, help="under torchrun: degree")
    parser.add_argument("--ring", type=int, default=None, help="under torchrun: degree")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in _floats(args.lengths)]
    depths = _floats(args.depths)
    if not lengths or min(lengths) < 1 or not depths or not all(0 <= d <= 1 for d in depths):
        parser.error("--lengths must be positive integers and --depths fractions in [0, 1]")
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")

    def run() -> Path | None:
        from longtrain.convert.hf_export import (
            load_checkpoint_model,
            load_run_config,
            resolve_checkpoint,
        )

        run_dir, ckpt = resolve_checkpoint(args.checkpoint)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            cfg = load_run_config(run_dir)
            _apply_parallel_args(cfg, args)
            return _run_parallel(args, cfg, run_dir, ckpt, lengths, depths)
        model, cfg = load_checkpoint_model(ckpt)
        device = torch.device(args.device)
        model = model.to(device).eval()
        tok = _tokenizer(cfg)
        filler = _filler(args.filler, tok, cfg, max(lengths))
        result = run_passkey(
            logits_scorer(model_next_token_logits(model, device)), tok, lengths, depths,
            args.trials, filler, args.seed,
        )  # fmt: skip
        return _write(result, args, run_dir, ckpt)

    out = report_errors("longtrain.eval.passkey", run)
    if out is not None:  # rank 0 (or the one process) wrote them
        print(f"passkey: {out / 'passkey.json'}, {out / 'passkey.png'}")


def _write(result: dict, args, run_dir: Path, ckpt: Path) -> Path:
    result.update({"checkpoint": str(ckpt), "filler": args.filler, "seed": args.seed})
    out = Path(args.out) if args.out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "passkey.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_passkey(result, out / "passkey.png", title=f"passkey: {ckpt.name}")
    return out


def _apply_parallel_args(cfg, args) -> None:
    """--parallel/--ulysses/--ring over the run's own parallel config."""
    if args.parallel is not None:
        cfg.parallel.method = args.parallel
    if args.ulysses is not None:
        cfg.parallel.ulysses = args.ulysses
    if args.ring is not None:
        cfg.parallel.ring = args.ring


def _run_parallel(args, cfg, run_dir: Path, ckpt: Path, lengths, depths) -> Path | None:
    """Passkey under torchrun: see the module doc. Rank 0 writes the files."""
    from longtrain.distributed import init_distributed, shutdown

    env = init_distributed(cfg.train.dist_timeout_s)
    try:
        tok = _tokenizer(cfg)
        model, ctx, dp_size = load_parallel_model(ckpt, cfg, env, tok.pad_id)
        filler = _filler(args.filler, tok, cfg, max(lengths))
        scorer = parallel_scorer(model, ctx, dp_size)
        result = run_passkey(scorer, tok, lengths, depths, args.trials, filler, args.seed)
        return _write(result, args, run_dir, ckpt) if env.is_main else None
    finally:
        shutdown(env)


def load_parallel_model(ckpt: Path, cfg, env, pad_id: int):
    """(model, StepContext, dp degree): the run's model built and sharded for this process
    group as `cfg.parallel` says (FSDP2), with the weights of checkpoint `ckpt`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from longtrain.config.rules import validate_run_config
    from longtrain.distributed.meta_start import build_parallel_model
    from longtrain.distributed.parallelize import build_parallel_dims

    if cfg.train.engine == "deepspeed":
        raise DataError(
            f"{ckpt} is a DeepSpeed checkpoint: run the passkey test in one process (without "
            "torchrun), which reads it whole"
        )
    cfg.train.engine = "fsdp2" if env.world_size > 1 else "none"
    validate_run_config(cfg, env.world_size)
    dims = build_parallel_dims(cfg, env)
    model, ctx = build_parallel_model(cfg, env, dims, pad_id=pad_id)
    state = get_model_state_dict(model)
    dcp.load({"model": state}, checkpoint_id=str(ckpt))
    set_model_state_dict(model, state)
    model.eval()
    return model, ctx, 1 if dims is None else dims.dp


if __name__ == "__main__":
    main()

__all__ = [
    "build_prompt",
    "load_parallel_model",
    "logits_scorer",
    "model_next_token_logits",
    "parallel_scorer",
    "plot_passkey",
    "run_passkey",
    "score",
]
