"""One training step of the configured run, simulated on fake tensors at the target world size.

Legend: W GPUs of the planned run, T tokens of one micro-batch (micro_batch x seq_len),
T_local = T / (ulysses x ring) tokens on one GPU, N blocks, k of them offloading their
checkpointed inputs (the first k), u = N - k blocks keeping them on the GPU.

The planner plays rank 0 of a fake process group of W ranks (collectives return at once),
builds the model with fake parameters, applies sequence parallelism and the memory stack
exactly as the trainer does, shards one micro-batch with `parallel.shard_packed`, and runs
the trainer's own forward (`forward_loss`, with the tiled loss) and the backward under
`MemoryTracker`. Kernels take their custom-op path, whose fake implementations allocate the
outputs only (as flash-attn does); workspaces the real kernels add are charged while they
run (`workspace_rules`). Which kernels: the planned run's, from the plan's keys where the
model says `auto` (`plan_kernels`), never what happens to be importable here.

Precision (`longtrain.distributed.precision`): where the engine hands the forward bf16
weights (FSDP2 over several ranks, DeepSpeed) the fake model's parameters are bf16; otherwise
they are the float32 (float64) master weights and the step runs under the step context's
autocast. The engine's own state (float32 shards, master copies, AdamW, gather buffers) comes
from `engine_state`. Gradients: engines that keep them whole keep what autograd makes;
sharding engines drop each full gradient as it is accumulated (its shard is a constant).

Offloaded block inputs go to the "meta" device: they leave the GPU and are counted as host
memory (planning a CPU run, they stay in the memory being planned), each at the size of the
pinned buffer it takes (`pinned_host_bytes`).

Blocks are identical, so a step of N blocks with k offloaded is simulated with small probe
models and extrapolated linearly (`probe_terms`): every kept block adds the same saved
input to the GPU, every offloaded one the same bytes to the host, and the high of each part
of the step stays at the same point of it. The regimes differ where offload's prefetch
shows (u < 2), so each regime has probes of its own, simulated only when asked for.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
from dataclasses import dataclass, field

import torch

from longtrain import torch_private as private
from longtrain.config import PlanConfig, RunConfig
from longtrain.config.rules import (
    check_global_batch,
    check_node_layout,
    check_plan,
    offloaded_blocks,
    validate_run_config,
)
from longtrain.data.batch import PackedBatch
from longtrain.distributed import DistEnv
from longtrain.distributed.memory.checkpointing import pinned_host_bytes
from longtrain.distributed.parallelize import (
    adaptive_placement,
    apply_model_stack,
    build_parallel_dims,
    step_context,
)
from longtrain.distributed.precision import engine_casts_params, master_dtype
from longtrain.errors import ConfigError
from longtrain.planner.engine_state import EngineState, engine_state
from longtrain.planner.tracker import CATEGORIES, MemoryTracker
from longtrain.trainer.step import LocalBatch, forward_loss, shard_micro_batch

GIB = 1 << 30
DEVICE = torch.device("cpu")  # fake tensors live on the CPU device; sizes are what matter
HOST = torch.device("meta")  # where offloaded activations go in the simulation


def _loss_workspace(func, args, kwargs) -> int:
    """The torch / triton tiled loss: one [t, V] float32 (float64) logits tile, plus a
    compute-dtype copy of the weight when it is stored in lower precision."""
    hidden, weight, tile_tokens = args[0], args[1], args[5]
    compute = 8 if torch.float64 in (hidden.dtype, weight.dtype) else 4
    tile = min(int(tile_tokens), hidden.shape[0]) * weight.shape[0] * compute
    copy = weight.numel() * compute if weight.element_size() < compute else 0
    return tile + copy


def _triton_loss_workspace(func, args, kwargs) -> int:
    """The triton tiled loss: one [t, V] float32 tile, and its 16-bit copy for 16-bit hidden."""
    hidden, weight, tile_tokens = args[0], args[1], args[5]
    tile = min(int(tile_tokens), hidden.shape[0]) * weight.shape[0]
    return tile * (4 + (hidden.element_size() if hidden.element_size() < 4 else 0))


def _flash_bwd_workspace(func, args, kwargs) -> int:
    """flash-attn's backward (and torch's copy of it, `torch_varlen`) accumulates dq in float32
    ([T, H, D]) and keeps a float32 [H, T] row statistic."""
    q = args[3]
    return q.numel() * 4 + q.shape[0] * q.shape[1] * 4


def _triton_attn_bwd_workspace(func, args, kwargs) -> int:
    """Our triton backward keeps one float32 [H, T] row statistic (delta = rowsum(dO * O))."""
    q = args[3]
    return q.shape[0] * q.shape[1] * 4


def workspace_rules(device: str, attn_backend: str = "flash_attn") -> dict:
    """Op name -> workspace rule for a run on `device` with attention `attn_backend`."""
    rules = {
        "longtrain::linear_cross_entropy_fwd": _loss_workspace,
        "longtrain::triton_linear_ce": _triton_loss_workspace,
    }
    if device == "cuda" and attn_backend in ("flash_attn", "torch_varlen"):
        rules["longtrain::attn_varlen_bwd"] = _flash_bwd_workspace
    elif device == "cuda" and attn_backend == "triton":
        rules["longtrain::attn_varlen_bwd"] = _triton_attn_bwd_workspace
    return rules


def plan_kernels(cfg: RunConfig, plan: PlanConfig) -> dict:
    """The kernels of the planned run: {"attention", "rope_norm", "loss"} -> backend.

    What the model config names; for `auto`, what `auto` picks on the target, never what is
    importable here: attention `plan.attn_backend` (flash_attn by default; `auto` takes it
    when installed, else triton), RoPE and RMSNorm `plan.kernel_backend` (triton by
    default, as `auto` on CUDA), the loss its torch path (`kernels.loss`: `auto` is the
    torch path on every device). CPU plans and float64 runs take the torch kernels (the GPU
    kernels do not take float64)."""
    torch_only = plan.device == "cpu" or cfg.model.dtype == "float64"
    attention, kernels = cfg.model.attn_backend, cfg.model.kernel_backend
    if attention == "auto":
        attention = "torch" if torch_only else plan.attn_backend
    rope_norm = loss = kernels
    if kernels == "auto":
        rope_norm = "torch" if torch_only else plan.kernel_backend
        loss = "torch"
    return {"attention": attention, "rope_norm": rope_norm, "loss": loss}


# The modules that register the triton kernels' custom ops (and their fake implementations).
_TRITON_MODULES = {
    "rope_norm": ("kernels.rope.triton_rope", "kernels.norm.triton_norm"),
    "loss": ("kernels.loss.triton_ce",),
}


def _check_kernels_importable(chosen: dict) -> None:
    """Simulating a triton kernel runs its fake implementation, which lives beside the kernel
    and imports triton: without it the plan cannot be made as asked (and is never made with
    other kernels instead). One line, before any work."""
    import importlib

    for part, modules in _TRITON_MODULES.items():
        if chosen[part] != "triton":
            continue
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ConfigError(
                    f"planning the triton kernels ({part}) needs the triton package here to "
                    f"simulate them ({err}); install triton, or plan other kernels with "
                    "plan.kernel_backend=torch"
                ) from err


@dataclass
class StepMemory:
    """Memory of one GPU over one simulated step."""

    seq_len: int
    tokens_per_gpu: int  # T_local of one micro-batch
    peak_bytes: int  # tensors on the GPU at the step's high-water mark
    breakdown: dict  # category -> bytes at that mark
    # forward | loss forward | loss backward | backward (its first block) | backward inner |
    # backward block 0 | backward embed | optimizer step
    peak_at: str
    host_bytes: int  # offloaded activations (at their most) + engine state on the host
    engine: str = ""
    phases: dict = field(default_factory=dict)  # part of the step -> its high, bytes
    offloaded_blocks: int = 0  # k: blocks whose checkpointed inputs wait on the host
    host_breakdown: dict = field(default_factory=dict)  # what host_bytes is made of

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def resolve_world(cfg: RunConfig, plan: PlanConfig) -> tuple[int, int, int]:
    """(world size, ulysses, ring) of the planned run."""
    from longtrain.distributed.parallelize import resolve_degrees

    p = cfg.parallel
    world = plan.world_size
    if world == 0:
        ulysses = p.ulysses if p.method in ("ulysses", "usp") else 1
        ring = p.ring if p.method in ("ring", "usp", "auto") else 1
        if ulysses == 0 or ring == 0:
            raise ValueError(
                f"parallel.ulysses={p.ulysses} / parallel.ring={p.ring} use 'every rank': "
                "set plan.world_size to the number of GPUs to plan for"
            )
        world = ulysses * ring
    ulysses, ring = resolve_degrees(cfg, world)
    return world, ulysses, ring


@dataclass
class _Dynamic:
    """What the tracker saw in one simulated micro-batch of one model: the high of every
    part of the step (forward, loss forward, loss backward, backward) with its breakdown."""

    highs: dict  # label -> (bytes, breakdown)
    grads_after: int  # gradient bytes left on the GPU after the backward
    host_peak: int

    @staticmethod
    def combine(terms: list[tuple[int, _Dynamic]]) -> _Dynamic:
        """sum(coefficient x probe), part by part (the coefficients sum to 1). A part some
        probe lacks takes the value of a probe that has it."""
        labels = [label for _, d in terms for label in d.highs]
        highs = {}
        for label in dict.fromkeys(labels):
            some = next(d.highs[label] for _, d in terms if label in d.highs)
            parts = [(c, d.highs.get(label, some)) for c, d in terms]
            total = sum(c * high for c, (high, _) in parts)
            split = {k: sum(c * s[k] for c, (_, s) in parts) for k in CATEGORIES}
            highs[label] = (total, split)
        return _Dynamic(
            highs,
            sum(c * d.grads_after for c, d in terms),
            sum(c * d.host_peak for c, d in terms),
        )

    def peak(self) -> tuple[int, dict, str]:
        label = max(self.highs, key=lambda k: self.highs[k][0])
        return self.highs[label][0], self.highs[label][1], label


def probe_terms(n: int, k: int, exact: bool = False) -> list[tuple[int, tuple[int, int]]]:
    """The step of N = `n` blocks with the first `k` offloaded, as a linear combination of
    probe models: [(coefficient, (blocks, offloaded))].

    In the backward an offloaded block i fetches its inputs and prefetches those of block
    i - 1 when that one is offloaded too; a kept block has the inputs of the kept blocks
    before it on the GPU. So blocks differ by position at the ends of each group: the first
    offloaded block (nothing to prefetch), the first kept one (no kept block before it), the
    last one (every kept input still there). Within a regime where the same ends exist
    (k = 0, 1 or >= 2 offloaded; u = 0, 1 or >= 2 kept) every part's high is linear in k and u:
    - k = 0: probes of 3 and 4 blocks, linear in N;
    - k = 1, u >= 2: (3, 1) and (4, 1), linear in u;
    - k >= 2, u >= 2: (4, 2) + (u - 2) x [(5, 2) - (4, 2)] + (k - 2) x [(5, 3) - (4, 2)];
    - k >= 3, u = 1: (4, 3) and (5, 4); u = 0: (3, 3) and (4, 4), linear in k.
    Every probe has an inner block (neither the first nor the last: `_backward_parts`).
    Models no larger than the largest probe (and `exact`) are simulated as they are."""
    u = n - k
    if exact or n <= 5:
        return [(1, (n, k))]
    if k == 0:
        return [(4 - n, (3, 0)), (n - 3, (4, 0))]
    if k == 1:
        return [(1 - (u - 2), (3, 1)), (u - 2, (4, 1))]
    if u >= 2:
        return [(1 - (u - 2) - (k - 2), (4, 2)), (u - 2, (5, 2)), (k - 2, (5, 3))]
    start, step = ((4, 3), (5, 4)) if u == 1 else ((3, 3), (4, 4))
    return [(1 - (k - 3), start), (k - 3, step)]


class Planner:
    """Simulates steps of `cfg` on `plan.world_size` fake GPUs. Use as a context manager:
    it owns a fake process group (one per process at a time) and the fake models.

    `measure(seq_len, offloaded)` simulates a step with the first `offloaded` blocks
    offloading their inputs (default: the configured count, `train.memory.
    offload_activations`), from probe models (`probe_terms`; `exact_layers=True` simulates
    all N blocks). Simulations are cached per (seq_len, probe)."""

    def __init__(self, cfg: RunConfig, plan: PlanConfig, exact_layers: bool = False) -> None:
        if cfg.model.name == "hf":
            raise ValueError(
                "the planner simulates longtrain's own Transformer; for a model=hf run, plan "
                "the same shapes with model=llama3_8b-style fields (dim, n_layers, heads, ffn_dim)"
            )
        check_plan(plan)
        self.adaptive = adaptive_placement(cfg)
        if cfg.parallel.method == "auto":
            # Of auto's layouts the ring all-gather holds the most (every rank's K/V at once):
            # plan that one. Its tokens per rank are the ring's, like Ulysses'.
            cfg = copy.deepcopy(cfg)
            cfg.parallel.ring_impl = "allgather"
        self.cfg, self.plan = cfg, plan
        self.world_size, self.ulysses, self.ring = resolve_world(cfg, plan)
        check_node_layout(self.world_size, plan.gpus_per_node)
        validate_run_config(cfg, self.world_size)
        self.n_layers = cfg.model.n_layers
        self.max_offloaded = offloaded_blocks(cfg.train.memory, self.n_layers)
        self.sp = self.ulysses * self.ring
        self.dp = self.world_size // self.sp
        if self.dp * self.sp != self.world_size:
            raise ValueError(
                f"plan.world_size={self.world_size} is not a multiple of ulysses x ring = "
                f"{self.ulysses} x {self.ring} = {self.sp}"
            )
        self.micro_batch, self.num_micro = self._micro_batches()
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = _vocab_size(cfg)
        self.exact_layers = exact_layers
        self.kernels = plan_kernels(cfg, plan)
        _check_kernels_importable(self.kernels)
        self.casts_params = engine_casts_params(cfg.model.dtype, cfg.train.engine, self.world_size)
        self.gpus_per_node = min(self.world_size, plan.gpus_per_node)
        self.host_budget = int(plan.host_mem_gib * GIB) // self.gpus_per_node
        self.dims = None
        self._stack = contextlib.ExitStack()
        self._models: dict = {}  # (blocks, offloaded) -> fake model
        self._runs: dict = {}  # (seq_len, blocks, offloaded) -> _Dynamic
        self._batches: dict = {}  # seq_len -> LocalBatch (the latest only)

    def _micro_batches(self) -> tuple[int, int]:
        check_global_batch(self.cfg.train.global_batch, self.dp)
        per_rank = self.cfg.train.global_batch // self.dp
        micro = self.cfg.train.micro_batch or per_rank
        if per_rank % micro:
            raise ValueError(
                f"train.micro_batch={micro} must divide the {per_rank} sequences per rank"
            )
        return micro, per_rank // micro

    def describe_assumptions(self) -> str:
        """One line: the kernels, precision and host memory the plan assumes."""
        k = self.kernels
        if self.cfg.model.dtype == "bfloat16":
            weights = "bf16 weights from the engine" if self.casts_params else "bf16 autocast"
            precision = f"bfloat16 ({weights}, float32 master weights and optimizer state)"
        else:
            precision = self.cfg.model.dtype
        return (
            f"assumes: attention {k['attention']}, RoPE / RMSNorm {k['rope_norm']}, loss "
            f"{k['loss']}; "
            f"{precision}; host memory {self.plan.host_mem_gib:g} GiB per node shared by "
            f"{self.gpus_per_node} GPU(s)"
        )

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> Planner:
        self._stack.enter_context(private.fake_process_group(self.world_size))
        try:
            # The trainer's own layout code, on a fake process group playing rank 0.
            env = DistEnv(rank=0, world_size=self.world_size, local_rank=0, device=DEVICE)
            self.dims = build_parallel_dims(self.cfg, env)
            self.ctx = step_context(self.cfg, env, self.dims, pad_id=0)
            # Adaptive placement is planned at its worst case instead (`_simulated_len`).
            self.ctx.sp_policy = None
            self.fake = private.fake_mode()
            n = self.n_layers
            full = self._model(n, self.max_offloaded)
            self.engine: EngineState = engine_state(self.cfg, full, self.world_size)
            self.param_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
            self.largest_param = max(p.numel() for p in full.parameters())
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._models.clear()
        self._stack.close()

    def _model(self, n_layers: int, offloaded: int):
        """A fake model of `n_layers` blocks, the first `offloaded` offloading their inputs,
        parallelised as `parallelize` does it up to the sharding engine (`apply_model_stack`).
        Parameters: bf16 where the engine casts them (what the forward sees), else the
        master dtype."""
        key = (n_layers, offloaded)
        if key in self._models:
            return self._models[key]
        from longtrain.model.llama import Transformer

        model_cfg = dataclasses.replace(
            self.cfg.model, n_layers=n_layers, kernel_backend=self.kernels["rope_norm"]
        )
        memory = dataclasses.replace(self.cfg.train.memory, offload_activations=offloaded)
        cfg = dataclasses.replace(
            self.cfg, model=model_cfg, train=dataclasses.replace(self.cfg.train, memory=memory)
        )
        dtype = torch.bfloat16 if self.casts_params else master_dtype(self.cfg.model.dtype)
        with self.fake, _default_dtype(dtype):
            model = Transformer(model_cfg)
            # RoPE and RMSNorm took their backend when built; the loss head reads the config.
            model.cfg = dataclasses.replace(model_cfg, kernel_backend=self.kernels["loss"])
            apply_model_stack(model, self.dims, cfg, offload_device=self._offload_device())
        self._models[key] = model
        return model

    def _offload_device(self) -> str:
        """Offloaded block inputs leave a GPU ("meta": host memory, counted apart); a CPU
        run offloads into the very memory it computes in, so they stay counted."""
        return HOST.type if self.plan.device == "cuda" else DEVICE.type

    # ------------------------------------------------------------------ one step
    def seq_multiple(self) -> int:
        return self.dims.seq_multiple() if self.dims is not None else 1

    def measure(self, seq_len: int, offloaded: int | None = None) -> StepMemory:
        """Peak memory of one GPU for micro-batches of `micro_batch` x `seq_len` tokens, with
        the first `offloaded` blocks offloading (default: the configured count)."""
        k = self.max_offloaded if offloaded is None else offloaded
        if not 0 <= k <= self.max_offloaded:
            raise ValueError(f"offloaded={k} must be in [0, {self.max_offloaded}]")
        if self.dims is not None:
            self.dims.validate(self.cfg.model.n_heads, self.cfg.model.n_kv_heads, seq_len)
        terms = probe_terms(self.n_layers, k, self.exact_layers)
        dyn = _Dynamic.combine([(c, self._run(seq_len, *probe)) for c, probe in terms if c])
        t_local = int(self._batch(seq_len).tokens.numel())
        return self._result(seq_len, t_local, dyn, k)

    def _run(self, seq_len: int, blocks: int, offloaded: int) -> _Dynamic:
        key = (seq_len, blocks, offloaded)
        if key not in self._runs:
            self._runs[key] = self._simulate(self._model(blocks, offloaded), self._batch(seq_len))
        return self._runs[key]

    def _simulate(self, model, local: LocalBatch) -> _Dynamic:
        tracker = MemoryTracker(
            DEVICE, workspace_rules(self.plan.device, self.kernels["attention"])
        )
        pinned = pinned_host_bytes if self.plan.device == "cuda" else None
        host = MemoryTracker(HOST, size_of=pinned)  # offloaded activations
        handles = self._grad_hooks(model, tracker)
        handles.append(model.norm.register_forward_hook(_loss_phase(tracker)))
        handles += _backward_parts(model, tracker)
        try:
            with _no_gc(), self.fake, private.kernels_compile_path(), host, tracker:
                self._prefill_grads(model)
                tracker.phase, tracker.label = "activations", "forward"
                loss = forward_loss(model, local, self.ctx)  # the trainer's own forward
                tracker.phase, tracker.label = "loss", "loss backward"
                loss.backward()
                del loss
                grads_after = tracker.by_category["gradients"]
        finally:
            self._fsdp2_live = {}
            for h in handles:
                h.remove()
            for p in model.parameters():
                p.grad = None
        return _Dynamic(dict(tracker.label_peaks), grads_after, host.peak)

    def _batch(self, seq_len: int) -> LocalBatch:
        """Rank 0's part of one micro-batch of `micro_batch` sequences of `seq_len` tokens (one
        document each), sharded by the trainer's `shard_micro_batch`; real tensors, with the
        attention plans built now (they read values, which fake tensors do not have)."""
        if seq_len in self._batches:
            return self._batches[seq_len]
        sim_len = self._simulated_len(seq_len)
        S, T = self.micro_batch, self.micro_batch * sim_len
        mb = PackedBatch(
            tokens=torch.zeros(T, dtype=torch.int64),
            labels=torch.ones(T, dtype=torch.int64),
            position_ids=torch.arange(sim_len).repeat(S),
            cu_seqlens=torch.arange(0, T + 1, sim_len, dtype=torch.int32),
            loss_weights=torch.ones(T, dtype=torch.float64),
            segment_is_padding=torch.zeros(S, dtype=torch.bool),
            num_sequences=S,
            num_docs=S,
            num_padding=0,
        )
        local = shard_micro_batch(mb, self.ctx)
        if self.ctx.dims is not None:
            meta = local.attn_meta
            meta.gathered_meta(DEVICE)
            if self.ring > 1:
                if self.cfg.parallel.ring_impl == "allgather":
                    meta.allgather_plan(True, DEVICE)
                else:
                    meta.zigzag_plans(True, DEVICE)
        self._batches = {seq_len: local}
        return local

    def _simulated_len(self, seq_len: int) -> int:
        """The sequence length simulated for `seq_len`: itself, or under adaptive placement
        its worst case, where a rank holds the most tokens the placement allows (the fixed
        layout's times 1 + parallel.adaptive_slack, parallel/adaptive.py), rounded up to
        the layout's multiple."""
        if not self.adaptive:
            return seq_len
        m = self.seq_multiple()
        worst = math.ceil(seq_len * (1 + self.cfg.parallel.adaptive_slack))
        return -(-worst // m) * m

    def _grad_hooks(self, model, tracker: MemoryTracker) -> list:
        """Keep whole gradients where the engine does; otherwise drop each as it is
        accumulated (reduced into the engine's shard: FSDP2's appear when a block's backward
        ends, `_fsdp2_schedule`; DeepSpeed's partition is a constant)."""
        keep_all = self.engine.keep_full_grads
        handles = []
        for name, p in model.named_parameters():
            # FSDP2 holds a block's unsharded gradients until its backward ends.
            in_block = bool(self.engine.gather) and name.startswith("layers.")
            keep = keep_all or in_block or name in self.engine.full_grad_params

            def hook(param, keep=keep):
                if keep:
                    tracker.relabel(param.grad, "gradients")
                else:
                    param.grad = None

            handles.append(p.register_post_accumulate_grad_hook(hook))
        if self.engine.gather:
            handles += self._fsdp2_schedule(model, tracker)
        return handles

    def _fsdp2_schedule(self, model, tracker: MemoryTracker) -> list:
        """FSDP2's buffers, block by block, at the times FSDP2 holds them (its implicit
        prefetch: one block ahead in the forward, one behind in the backward). Forward: block
        i gathered from its pre-forward to its post-forward (resharded after forward), block
        i + 1's all-gather in flight meanwhile. Backward (pre-backward to post-backward, the
        recompute of a checkpointed block inside it): block i gathered, block i - 1
        prefetched, block i's unsharded gradients as autograd makes them (`_grad_hooks`); at
        its end the previous reduce-scatter input is released, block i's is made (held until
        the next one), its float32 gradient shards appear (with one micro-batch; with more
        they are constants) and its unsharded gradients are released."""
        gather, reduce = self.engine.gather, self.engine.reduce
        master = master_dtype(self.cfg.model.dtype)
        n = len(model.layers)
        live = self._fsdp2_live = {}

        def alloc(key, nbytes: int, category: str = "communication") -> None:
            if key not in live:
                phase, tracker.phase = tracker.phase, category
                live[key] = torch.empty(nbytes, dtype=torch.uint8)
                tracker.phase = phase

        def in_backward() -> bool:
            return tracker.label.startswith(("loss backward", "backward"))

        handles = []
        for i, block in enumerate(model.layers):
            names = [f"layers.{i}.{name}" for name, _ in block.named_parameters()]
            shard_bytes = sum(self.engine.grad_shards.get(k, 0) for k in names) * master.itemsize

            def pre_forward(module, args, i=i):
                if not in_backward():  # (a recompute runs inside the block's backward)
                    alloc(("gathered", i), gather)
                    if i + 1 < n:
                        alloc(("gathered", i + 1), gather)

            def post_forward(module, args, output, i=i):
                if not in_backward():
                    live.pop(("gathered", i), None)

            def pre_backward(module, grad_output, i=i):
                alloc(("gathered", i), gather)
                if i > 0:
                    alloc(("gathered", i - 1), gather)

            def post_backward(module, grad_input, grad_output, i=i, shard_bytes=shard_bytes):
                live.pop("reduce-scatter input", None)
                alloc("reduce-scatter input", reduce)
                if self.num_micro == 1:  # with accumulation the shards are constants
                    alloc(("shards", i), shard_bytes, "gradients")
                for p in module.parameters():
                    p.grad = None  # the unsharded gradients, reduced
                live.pop(("gathered", i), None)

            handles.append(block.register_forward_pre_hook(pre_forward))
            handles.append(block.register_forward_hook(post_forward))
            handles.append(block.register_full_backward_pre_hook(pre_backward))
            handles.append(block.register_full_backward_hook(post_backward))
        return handles

    def _accumulates_full_grads(self) -> bool:
        return self.num_micro > 1 and self.engine.keep_full_grads

    def _prefill_grads(self, model) -> None:
        """With gradient accumulation, whole gradients exist before the micro-batch runs."""
        if self._accumulates_full_grads():
            for p in model.parameters():
                p.grad = torch.zeros_like(p)  # counted as a constant (`_result`)

    def _result(self, seq_len: int, t_local: int, dyn: _Dynamic, offloaded: int) -> StepMemory:
        constants = self.engine.constants()
        if self._accumulates_full_grads():
            constants["gradients"] += self.param_bytes
        if self.num_micro > 1:
            elem = master_dtype(self.cfg.model.dtype).itemsize
            constants["gradients"] += sum(self.engine.grad_shards.values()) * elem
        fixed = sum(constants.values())
        dyn_peak, dyn_split, where = dyn.peak()
        breakdown = {c: dyn_split.get(c, 0) + constants.get(c, 0) for c in CATEGORIES}
        peak = dyn_peak + fixed
        # The optimizer step: model state, the gradients left after the backward, and AdamW's
        # one temporary of the largest (shard of a) parameter when the state is on the GPU.
        adam = self._adam_temp() if self.engine.optimizer else 0
        if fixed + dyn.grads_after + adam > peak:
            peak, where = fixed + dyn.grads_after + adam, "optimizer step"
            breakdown = dict(constants, activations=0, loss=0)
            breakdown["gradients"] += dyn.grads_after
            breakdown["optimizer"] += adam
        phases = {label: int(high + fixed) for label, (high, _) in dyn.highs.items()}
        phases["optimizer step"] = int(fixed + dyn.grads_after + adam)
        host_parts = {"offloaded activations": int(dyn.host_peak), **self.engine.host_parts}
        return StepMemory(
            seq_len=seq_len,
            tokens_per_gpu=t_local,
            peak_bytes=int(peak),
            breakdown={k: int(v) for k, v in breakdown.items()},
            peak_at=where,
            host_bytes=int(dyn.host_peak + self.engine.host),
            engine=self.engine.engine,
            phases=phases,
            offloaded_blocks=offloaded,
            host_breakdown=host_parts,
        )

    def _adam_temp(self) -> int:
        shard = self.world_size if self.engine.engine != "none" else 1
        elem = master_dtype(self.cfg.model.dtype).itemsize
        return math.ceil(self.largest_param / shard) * elem


def _loss_phase(tracker: MemoryTracker):
    """Forward hook of the final norm: what follows is the loss; the gradient reaching the
    norm's output marks the end of the loss's backward."""

    def hook(module, args, output):
        tracker.phase, tracker.label = "loss", "loss forward"
        if output.requires_grad:
            output.register_hook(lambda grad: _set(tracker, "activations", "backward"))

    return hook


def _backward_parts(model, tracker: MemoryTracker) -> list:
    """Label the backward by where it is: the first block it reaches (the last one: the most
    saved inputs), the inner blocks, the first block of the model (no block before it to
    prefetch; the most gradients or shards made), and the embedding after it. Within the
    inner blocks each one differs from the next by the same bytes, so their high sits at a
    fixed end whatever the number of blocks, and every part extrapolates on its own."""
    n = len(model.layers)

    def starts(module, grad_output, i):
        if i == n - 1:
            tracker.label = "backward"
        elif i == 0:
            tracker.label = "backward block 0"
        else:
            tracker.label = "backward inner"

    def ends(module, grad_input, grad_output, i):
        if i == 0:
            tracker.label = "backward embed"

    handles = []
    for i, block in enumerate(model.layers):
        handles.append(block.register_full_backward_pre_hook(lambda m, g, i=i: starts(m, g, i)))
        handles.append(block.register_full_backward_hook(lambda m, gi, go, i=i: ends(m, gi, go, i)))
    return handles


def _set(tracker: MemoryTracker, phase: str, label: str) -> None:
    tracker.phase, tracker.label = phase, label


@contextlib.contextmanager
def _no_gc():
    """Python's cycle collector off while a step is simulated: it walks every live fake
    tensor again and again (half the time of a step of 5 blocks). Tensors are freed by
    reference counting as in a real step; the collector runs once afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        gc.collect()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters are made in `dtype`: bf16 (what a casting engine's forward sees), or the
    master dtype (float32, float64)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _vocab_size(cfg: RunConfig) -> int:
    if cfg.data.tokenizer in ("", "byte"):  # "": the byte tokenizer when a store is built
        from longtrain.data.tokenizer import ByteTokenizer

        return ByteTokenizer.vocab_size
    from longtrain.data.tokenizer import HFTokenizer

    return HFTokenizer(cfg.data.tokenizer).vocab_size


__all__ = [
    "GIB",
    "Planner",
    "StepMemory",
    "plan_kernels",
    "probe_terms",
    "resolve_world",
    "workspace_rules",
]
