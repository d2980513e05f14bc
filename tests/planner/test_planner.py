"""The planner: exact extrapolation over blocks, monotonic in seq_len and in parallel degrees,
a search that stops at the edge, clear refusals, and the recipes' plans."""

import re

import pytest

from longtrain.config import ModelConfig, ParallelConfig, PlanConfig, RunConfig, compose_config
from longtrain.planner.search import PlanError, budget_bytes, find_max_seq_len, granule
from longtrain.planner.simulate import GIB, Planner

STACK = {"mlp_tiles": 0, "mlp_tile_budget_mib": 1, "activation_checkpoint": "full",
         "offload_activations": True}  # fmt: skip


def small_config(ulysses: int = 1, engine: str = "fsdp2", n_layers: int = 6, **memory):
    cfg = RunConfig()
    cfg.model = ModelConfig(
        vocab_size=259, dim=128, n_layers=n_layers, n_heads=8, n_kv_heads=4, ffn_dim=352,
        dtype="bfloat16",
    )  # fmt: skip
    cfg.data.seq_len = 4096
    if ulysses > 1:
        cfg.parallel = ParallelConfig(method="ulysses", ulysses=ulysses)
    cfg.train.engine = engine
    cfg.train.global_batch = 1
    for key, value in memory.items():
        setattr(cfg.train.memory, key, value)
    return cfg


@pytest.mark.parametrize(
    "ulysses,engine,memory",
    [
        (1, "none", {}),
        (2, "fsdp2", STACK),
        (2, "deepspeed", {"activation_checkpoint": "selective", "mlp_tiles": 2}),
    ],
    ids=["plain", "ulysses2-fsdp2-stack", "ulysses2-zero3-selective"],
)
def test_extrapolating_over_blocks_is_exact(ulysses, engine, memory):
    """Blocks are identical: simulating 2 and 3 blocks and extrapolating gives, byte for byte,
    the peak and breakdown of simulating all 6."""
    cfg = small_config(ulysses, engine, **memory)
    plan = PlanConfig(world_size=ulysses)
    with Planner(cfg, plan) as fast:
        a = fast.measure(2048)
    with Planner(small_config(ulysses, engine, **memory), plan, exact_layers=True) as full:
        b = full.measure(2048)
    assert (a.peak_bytes, a.breakdown, a.peak_at) == (b.peak_bytes, b.breakdown, b.peak_at)


def test_monotonic_in_seq_len():
    with Planner(small_config(2, "fsdp2", **STACK), PlanConfig(world_size=2)) as planner:
        peaks = [planner.measure(n).peak_bytes for n in (512, 1024, 2048, 4096, 8192)]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)


def test_monotonic_in_degrees():
    """More GPUs per sequence: less memory per GPU at a given length, and a longer max."""
    peaks, longest = [], []
    for degree in (1, 2, 4):
        cfg = small_config(degree, "fsdp2", n_layers=2, **STACK)
        plan = PlanConfig(world_size=degree, gpu_mem_gib=0.03, reserve_gib=0, seq_len_step=512)
        with Planner(cfg, plan) as planner:
            peaks.append(planner.measure(4096).peak_bytes)
            budget = budget_bytes(plan.gpu_mem_gib, plan.reserve_gib)
            longest.append(find_max_seq_len(planner, budget, first_guess=4096).max_seq_len)
    assert peaks[0] > peaks[1] > peaks[2]
    assert longest[0] < longest[1] < longest[2]


def test_search_stops_at_the_edge():
    cfg = small_config(2, "deepspeed", **STACK)
    plan = PlanConfig(world_size=2, gpu_mem_gib=0.05, reserve_gib=0.01, seq_len_step=512)
    budget = budget_bytes(plan.gpu_mem_gib, plan.reserve_gib)
    with Planner(cfg, plan) as planner:
        found = find_max_seq_len(planner, budget, first_guess=1024)
        g = granule(planner)
        assert found.max_seq_len % g == 0 and found.limited_by == "memory"
        assert found.at_max.peak_bytes <= budget
        assert planner.measure(found.max_seq_len + g).peak_bytes > budget
    assert len(found.evaluations) <= 8  # a handful of simulations, not a scan


def test_nothing_fits_is_refused_with_the_numbers():
    cfg = small_config(1, "none")
    plan = PlanConfig(world_size=1, gpu_mem_gib=0.002, reserve_gib=0)
    with Planner(cfg, plan) as planner, pytest.raises(PlanError) as err:
        find_max_seq_len(planner, budget_bytes(0.002, 0), first_guess=4096)
    message = str(err.value)
    assert "nothing fits: even seq_len=1024 needs" in message
    assert "plan.gpu_mem_gib=0.002" in message and "more GPUs" in message


def test_impossible_layout_is_refused():
    with pytest.raises(ValueError, match=re.escape("ulysses=3 needs query heads (8) divisible")):
        Planner(small_config(3), PlanConfig(world_size=3)).__enter__()


def test_reserve_must_leave_memory():
    with pytest.raises(ValueError, match="need 0 <= reserve < gpu memory"):
        budget_bytes(gpu_mem_gib=1, reserve_gib=2)


def test_world_size_must_hold_the_layout():
    cfg = small_config(4)
    with pytest.raises(ValueError, match="not a multiple of ulysses x ring"):
        Planner(cfg, PlanConfig(world_size=6))


@pytest.mark.parametrize("ulysses", [8, 4])
def test_llama3_8b_1m_recipe_fits_and_scales(ulysses):
    """The recipe plans as is and with parallel.ulysses=4 (no search: one simulation)."""
    cfg = compose_config(
        ["experiment=llama3_8b_1m_sp8", f"parallel.ulysses={ulysses}", "plan.search=false"]
    )
    with Planner(cfg, cfg.plan) as planner:
        step = planner.measure(cfg.data.seq_len)
    assert planner.world_size == ulysses and step.tokens_per_gpu == (1 << 20) // ulysses
    # ZeRO-3 over 8 (4) GPUs with the optimizer offloaded: parameters are an eighth (a quarter)
    # of 8.03e9 x 4 B, plus the gathered output projection (128256 x 4096 x 4 B).
    shard = 8_030_261_248 * 4 / ulysses + 128256 * 4096 * 4
    assert step.breakdown["parameters"] == pytest.approx(shard, rel=1e-3)
    assert step.breakdown["optimizer"] == 0
    assert step.peak_bytes < budget_bytes(cfg.plan.gpu_mem_gib, cfg.plan.reserve_gib)
    assert step.peak_bytes / GIB == pytest.approx({8: 30.8, 4: 52.9}[ulysses], abs=2.0)
