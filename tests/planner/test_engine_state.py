"""The engine table of `longtrain.planner.engine_state`, on a model small enough to count by
hand: shard sizes, what stays whole, what the host holds."""

import pytest

from longtrain.config import ModelConfig, RunConfig
from longtrain.model.llama import Transformer
from longtrain.planner.engine_state import engine_state

# dim 8, 1 block: wq/wo [8, 8], wk/wv [4, 8], w1/w3 [16, 8], w2 [8, 16], 2 norms [8];
# embed and output [10, 8], final norm [8].
BLOCK = 64 + 64 + 32 + 32 + 128 + 128 + 128 + 8 + 8  # 592
ROOT = 80 + 80 + 8  # 168
P = BLOCK + ROOT


def _cfg(engine: str, **ds) -> RunConfig:
    cfg = RunConfig()
    cfg.model = ModelConfig(vocab_size=10, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16)
    cfg.train.engine = engine
    for key, value in ds.items():
        setattr(cfg.train.deepspeed, key, value)
    return cfg


def _state(cfg, world):
    return engine_state(cfg, Transformer(cfg.model), world)


def test_one_process_holds_everything():
    s = _state(_cfg("fsdp2"), 1)  # FSDP2 needs 2 ranks: one process trains plain
    assert (s.engine, s.parameters, s.optimizer, s.communication) == ("none", 4 * P, 8 * P, 0)
    assert s.keep_full_grads


def test_fsdp2_shards_dim0_and_keeps_the_root_whole():
    s = _state(_cfg("fsdp2"), 4)
    # dim-0 chunks of ceil(rows / 4): wq 2x8, wk 1x8, wv 1x8, wo 2x8, w1 4x8, w3 4x8, w2 2x16,
    # norms 2 + 2; embed 3x8, output 3x8, final norm 2.
    shard = 16 + 8 + 8 + 16 + 32 + 32 + 32 + 2 + 2 + 24 + 24 + 2
    assert s.parameters == 4 * (shard + ROOT)
    assert s.optimizer == 8 * shard
    assert s.communication == 4 * 4 * BLOCK
    assert sum(s.grad_shards.values()) == shard - (24 + 24 + 2)  # root grads stay whole
    assert s.full_grad_params == {"embed.weight", "output.weight", "norm.weight"}


@pytest.mark.parametrize(
    "stage,offload,params,optimizer,host",
    [
        # ZeRO partitions are ceil(numel / W) per tensor; W = 4 divides every size here.
        (1, False, 4 * P, (8 + 4) * P // 4, 0),
        (2, False, 4 * P, (8 + 4) * P // 4, 0),
        (3, False, 4 * P // 4 + 4 * 80, (8 + 4) * P // 4, 0),
        (3, True, 4 * P // 4 + 4 * 80, 0, (8 + 4 + 4) * P // 4),
    ],
)
def test_deepspeed_stages(stage, offload, params, optimizer, host):
    s = _state(_cfg("deepspeed", zero_stage=stage, offload_optimizer=offload), 4)
    assert (s.parameters, s.optimizer, s.host) == (params, optimizer, host)
    assert s.keep_full_grads == (stage == 1)
