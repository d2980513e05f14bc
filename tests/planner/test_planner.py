"""The planner: exact extrapolation over blocks and offload splits, monotonic in seq_len and in
parallel degrees, host memory as a second budget, a search that stops at the edge and picks
the split, clear refusals, and the recipes' plans."""

import re

import pytest

import kernels.norm
import kernels.rope
from longtrain.config import ModelConfig, ParallelConfig, PlanConfig, RunConfig, compose_config
from longtrain.distributed.memory.checkpointing import pinned_host_bytes
from longtrain.errors import ConfigError
from longtrain.planner.search import (
    PlanError,
    budget_bytes,
    evaluate,
    find_max_seq_len,
    granule,
)
from longtrain.planner.simulate import GIB, Planner, plan_kernels

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


def _same(a, b) -> bool:
    return (a.peak_bytes, a.breakdown, a.peak_at, a.phases, a.host_bytes) == (
        b.peak_bytes, b.breakdown, b.peak_at, b.phases, b.host_bytes,
    )  # fmt: skip


@pytest.mark.parametrize(
    "ulysses,engine,memory,splits",
    [
        (1, "none", {}, [0]),
        # Whole gradients kept (engine none): the backward's high may sit at either end.
        (1, "none", STACK, [0, 1, 3, 5, 6]),
        (2, "fsdp2", STACK, [0, 1, 3, 5, 6]),
        (
            2,
            "deepspeed",
            {**STACK, "activation_checkpoint": "selective", "mlp_tiles": 2},
            [0, 1, 3, 5, 6],
        ),
    ],  # fmt: skip
    ids=["plain", "none-stack", "ulysses2-fsdp2-stack", "ulysses2-zero3-selective"],
)
def test_extrapolating_over_blocks_and_splits_is_exact(ulysses, engine, memory, splits):
    """Blocks are identical: the probe models of every regime (no block offloaded, one, two
    or more with two or more kept, all but one, all; `probe_terms`) extrapolated give, byte
    for byte, the peak, breakdown, parts and host memory of simulating all 6 blocks."""
    plan = PlanConfig(world_size=ulysses)
    with Planner(small_config(ulysses, engine, **memory), plan) as fast:
        a = [fast.measure(1024, k) for k in splits]
    with Planner(small_config(ulysses, engine, **memory), plan, exact_layers=True) as full:
        b = [full.measure(1024, k) for k in splits]
    for k, x, y in zip(splits, a, b):
        assert _same(x, y), k


def test_offload_trades_gpu_for_host_block_by_block():
    """Each offloaded block puts its inputs (bf16 x and int64 positions, each in pinned
    pieces) on the host, so host memory grows by the same bytes per block, and takes its x
    off the GPU while the loss runs (every block input waits then). The GPU peak never grows
    by more than the fetched copy of the positions (kept blocks share the batch's own)."""
    cfg = small_config(2, "fsdp2", **STACK)
    with Planner(cfg, PlanConfig(world_size=2)) as planner:
        steps = [planner.measure(2048, k) for k in range(7)]
    t_local = steps[0].tokens_per_gpu
    x_bytes, positions = t_local * 128 * 2, t_local * 8
    per_block = pinned_host_bytes(x_bytes) + pinned_host_bytes(positions)
    assert [s.host_bytes for s in steps] == [k * per_block for k in range(7)]
    loss = [s.phases["loss forward"] for s in steps]
    # (With no kept block left, a copy of the positions that kept blocks shared goes too.)
    assert [a - b for a, b in zip(loss, loss[1:])] == [x_bytes] * 5 + [x_bytes + positions]
    assert max(s.peak_bytes for s in steps) <= steps[0].peak_bytes + positions


@pytest.mark.parametrize("engine,world,param_dtype", [("fsdp2", 2, "bfloat16"),
                                                      ("none", 1, "float32")])  # fmt: skip
def test_bf16_weights_are_what_the_forward_sees(engine, world, param_dtype):
    """FSDP2 over 2 ranks gathers bf16 weights: the fake model is bf16; one process keeps
    float32 weights and runs under autocast."""
    cfg = small_config(world, engine, **STACK)
    with Planner(cfg, PlanConfig(world_size=world)) as planner:
        model = planner._model(2, 0)
        assert {str(p.dtype) for p in model.parameters()} == {f"torch.{param_dtype}"}
        assert planner.ctx.autocast == (engine == "none")


def test_plan_kernels_come_from_the_plan_not_from_this_machine(monkeypatch):
    cfg = small_config(2, "fsdp2", **STACK)
    assert plan_kernels(cfg, PlanConfig()) == {
        "attention": "flash_attn", "rope_norm": "triton", "loss": "torch",
    }  # fmt: skip
    assert set(plan_kernels(cfg, PlanConfig(device="cpu")).values()) == {"torch"}
    cfg.model.kernel_backend = "triton"  # named in the config: what the run uses
    assert plan_kernels(cfg, PlanConfig(device="cpu"))["loss"] == "triton"
    plan = PlanConfig(world_size=2)
    with Planner(small_config(2, "fsdp2", **STACK), plan) as planner:
        here = planner.measure(2048)
    # The kernels' own `auto` asks whether triton is installed; the plan must not.
    monkeypatch.setattr(kernels.rope, "triton_available", lambda: False)
    monkeypatch.setattr(kernels.norm, "triton_available", lambda: False)
    with Planner(small_config(2, "fsdp2", **STACK), plan) as planner:
        assert _same(planner.measure(2048), here)
        assert "RoPE / RMSNorm triton" in planner.describe_assumptions()


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


def test_search_stops_at_the_gpu_edge():
    cfg = small_config(2, "deepspeed", **STACK)
    plan = PlanConfig(world_size=2, gpu_mem_gib=0.05, reserve_gib=0.01, seq_len_step=512)
    budget = budget_bytes(plan.gpu_mem_gib, plan.reserve_gib)
    with Planner(cfg, plan) as planner:
        found = find_max_seq_len(planner, budget, first_guess=1024)
        g = granule(planner)
        assert found.max_seq_len % g == 0 and found.limited_by == "gpu memory"
        assert found.at_max.peak_bytes <= budget
        assert not evaluate(planner, found.max_seq_len + g, budget).fits
        # The split: the fewest blocks offloaded that fit; one fewer does not.
        k = found.at_max.offloaded_blocks
        if k:
            assert planner.measure(found.max_seq_len, k - 1).peak_bytes > budget
    assert len(found.evaluations) <= 8  # a handful of simulations, not a scan


def test_host_memory_binds_and_the_split_stays_within_it():
    """A node whose host holds only one block's inputs at 4096 tokens: the longest length is
    where the blocks the host can take no longer relieve the GPU enough; the plan says host
    memory binds, its split fits both budgets, and the GPU alone would take a longer one."""
    cfg = small_config(2, "fsdp2", **STACK)
    gpu = PlanConfig(world_size=2, gpu_mem_gib=0.05, reserve_gib=0.01, seq_len_step=512)
    budget = budget_bytes(gpu.gpu_mem_gib, gpu.reserve_gib)
    with Planner(cfg, gpu) as free:  # the default host: 1.9 TB a node
        fit = evaluate(free, 4096, budget)
    # 4096 tokens fit only by offloading several blocks' inputs.
    assert fit.fits and fit.at.offloaded_blocks > 1
    # Room for the inputs of 1 block at 4096, shared by the 2 GPUs of a node.
    host_gib = 2 * fit.block_host / GIB
    plan = PlanConfig(world_size=2, gpu_mem_gib=0.05, reserve_gib=0.01, seq_len_step=512,
                      host_mem_gib=host_gib)  # fmt: skip
    with Planner(small_config(2, "fsdp2", **STACK), plan) as planner:
        found = find_max_seq_len(planner, budget, first_guess=4096)
        g = granule(planner)
        assert planner.host_budget == int(host_gib * GIB) // 2
        assert found.limited_by == "host memory"
        at_max = found.at_max
        assert at_max.peak_bytes <= budget and at_max.host_bytes <= planner.host_budget
        assert at_max.offloaded_blocks <= 1
        beyond = evaluate(planner, found.max_seq_len + g, budget)
        assert not beyond.fits and beyond.binds == "host memory"
    # With the host it needs, the GPU takes that next length: the host is what binds.
    with Planner(small_config(2, "fsdp2", **STACK), gpu) as free:
        assert evaluate(free, found.max_seq_len + g, budget).fits


def test_nothing_fits_is_refused_with_the_numbers():
    cfg = small_config(1, "none")
    plan = PlanConfig(world_size=1, gpu_mem_gib=0.002, reserve_gib=0)
    with Planner(cfg, plan) as planner, pytest.raises(PlanError) as err:
        find_max_seq_len(planner, budget_bytes(0.002, 0), first_guess=4096)
    message = str(err.value)
    assert "nothing fits: even seq_len=1024 needs" in message
    assert "plan.gpu_mem_gib=0.002" in message and "more GPUs" in message


@pytest.mark.parametrize(
    "plan,memory,message",
    [
        ({"host_mem_gib": 0}, {}, "plan.host_mem_gib=0 must be > 0"),
        ({"host_mem_gib": -3.0}, {}, "plan.host_mem_gib=-3 must be > 0"),
        (
            {"world_size": 12, "gpus_per_node": 8},
            {},
            "plan.gpus_per_node=8 does not divide the world size 12",
        ),
        (
            {"world_size": 4},
            {"offload_activations": 7},
            "offload_activations=7 is above the model's 6 blocks",
        ),
    ],  # fmt: skip
)
def test_bad_plan_input_is_one_line_before_any_work(plan, memory, message):
    cfg = small_config(4, "fsdp2", **{**STACK, **memory})
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        Planner(cfg, PlanConfig(**plan))  # refused in the constructor: no simulation ran
    assert "\n" not in str(err.value)


def test_a_node_partly_used_shares_its_host_among_its_gpus():
    with Planner(small_config(2), PlanConfig(world_size=2, host_mem_gib=64)) as planner:
        assert planner.gpus_per_node == 2 and planner.host_budget == 32 * GIB


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
    """The recipe's stack with every block offloaded plans with Ulysses 8 and 4 (no search:
    one simulation)."""
    cfg = compose_config(
        ["experiment=llama3_8b_1m_sp8", f"parallel.ulysses={ulysses}", "plan.search=false",
         "train.memory.offload_activations=true"]
    )  # fmt: skip
    with Planner(cfg, cfg.plan) as planner:
        step = planner.measure(cfg.data.seq_len)
    assert planner.world_size == ulysses and step.tokens_per_gpu == (1 << 20) // ulysses
    # bf16 ZeRO-3 over 8 (4) GPUs with the optimizer offloaded: the module is bf16, so the
    # parameters are an eighth (a quarter) of 8.03e9 x 2 B, plus the gathered bf16 output
    # projection (128256 x 4096 x 2 B). (Before the bf16 runtime: float32 weights, x 4 B.)
    shard = 8_030_261_248 * 2 / ulysses + 128256 * 4096 * 2
    assert step.breakdown["parameters"] == pytest.approx(shard, rel=1e-3)
    assert step.breakdown["optimizer"] == 0
    # The offloaded optimizer: fp32 master, AdamW m and v, fp32 gradient partition, 16 B each.
    assert step.host_breakdown["optimizer offload"] == pytest.approx(
        16 * 8_030_261_248 / ulysses, rel=1e-3
    )
    assert step.peak_bytes < budget_bytes(cfg.plan.gpu_mem_gib, cfg.plan.reserve_gib)
    # bf16 activations and gathered weights (float32 before: 30.8 and 52.9 GiB).
    assert step.peak_bytes / GIB == pytest.approx({8: 16.2, 4: 28.0}[ulysses], abs=1.5)


def test_llama3_8b_1m_recipe_runs_without_offload():
    """At 1M tokens on 8 GPUs the planner's split offloads nothing: the recipe says 0."""
    cfg = compose_config(["experiment=llama3_8b_1m_sp8", "plan.search=false"])
    with Planner(cfg, cfg.plan) as planner:
        step = planner.measure(cfg.data.seq_len)
    assert step.offloaded_blocks == 0 and step.host_breakdown["offloaded activations"] == 0
    assert step.peak_bytes / GIB == pytest.approx(46.9, abs=1.5)  # one bf16 input per block


def test_adaptive_placement_is_planned_at_its_worst_case():
    """A rank may hold 1 + parallel.adaptive_slack times the fixed layout's tokens
    (parallel/adaptive.py): the plan of an adaptive run is the fixed one at that many, and
    parallel=auto plans its ring as all-gather (the layout of auto's that holds the most)."""
    plan = PlanConfig(world_size=2)
    adaptive_cfg = small_config(2, "none", n_layers=1)
    adaptive_cfg.parallel.adaptive = True
    with Planner(adaptive_cfg, plan) as adaptive:  # one planner at a time (its fake group)
        # The fixed layout's 2048 tokens a rank, times 1.25 (a multiple of Ulysses' 2).
        assert adaptive.measure(4096).tokens_per_gpu == 2560
    auto_cfg = small_config(1, "none", n_layers=1)
    auto_cfg.parallel = ParallelConfig(method="auto", ring=2, adaptive=True)
    with Planner(auto_cfg, plan) as auto:
        assert auto.cfg.parallel.ring_impl == "allgather"
        assert auto.measure(4096).tokens_per_gpu == 2560
