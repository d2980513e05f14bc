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
    # FSDP2's buffers are allocated in time by the planner: one block gathered, one block's
    # reduce-scatter input (float32 here, both).
    assert (s.communication, s.gather, s.reduce) == (0, 4 * BLOCK, 4 * BLOCK)
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


def _bf16(engine: str, **ds) -> RunConfig:
    cfg = _cfg(engine, **ds)
    cfg.model.dtype = "bfloat16"
    return cfg


def test_bf16_fsdp2_gathers_bf16_and_keeps_float32_shards():
    s = _state(_bf16("fsdp2"), 4)
    shard = 16 + 8 + 8 + 16 + 32 + 32 + 32 + 2 + 2 + 24 + 24 + 2  # as above
    assert s.parameters == 4 * shard + 2 * ROOT  # float32 shards, the root gathered in bf16
    assert s.optimizer == 8 * shard
    # A block gathered in bf16, its reduce-scatter input in float32.
    assert (s.communication, s.gather, s.reduce) == (0, 2 * BLOCK, 4 * BLOCK)


def test_bf16_one_process_autocasts_over_float32_state():
    s = _state(_bf16("fsdp2"), 1)
    assert (s.engine, s.parameters, s.optimizer) == ("none", 4 * P, 8 * P)


@pytest.mark.parametrize(
    "stage,offload,params,grads,optimizer,host",
    [
        # bf16 module (2 B), float32 master (4 B) + AdamW (8 B) partitions, float32 gradients.
        (1, False, 2 * P, 4 * P, 12 * P // 4, 0),  # ZeRO-1: a float32 buffer of every gradient
        (2, False, 2 * P, 4 * P // 4, 12 * P // 4, 0),
        (3, False, 2 * P // 4 + 2 * 80, 4 * P // 4, 12 * P // 4, 0),
        (3, True, 2 * P // 4 + 2 * 80, 0, 0, 16 * P // 4),
    ],
)
def test_bf16_deepspeed_module_and_float32_master(stage, offload, params, grads, optimizer, host):
    s = _state(_bf16("deepspeed", zero_stage=stage, offload_optimizer=offload), 4)
    assert (s.parameters, s.gradients, s.optimizer, s.host) == (params, grads, optimizer, host)
    assert sum(s.host_parts.values()) == s.host
    assert s.communication == (3 if stage == 3 else 1) * 2 * BLOCK
