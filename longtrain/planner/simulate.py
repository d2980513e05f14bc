"""One training step of the configured run, simulated on fake tensors at the target world size.

Legend: W GPUs of the planned run, T tokens of one micro-batch (micro_batch x seq_len),
T_local = T / (ulysses x ring) tokens on one GPU.

The planner plays rank 0 of a fake process group of W ranks (collectives return at once),
builds the model with fake parameters, applies sequence parallelism and the memory stack
exactly as the trainer does, shards one micro-batch with `parallel.shard_packed`, and runs
the forward (with the tiled loss) and the backward under `MemoryTracker`. Kernels take
their custom-op path, whose fake implementations allocate the outputs only (as flash-attn
does); workspaces the real kernels add are charged while they run (`workspace_rules`).
Offloaded block inputs go to the "meta" device: they leave the GPU and are counted as host
memory (planning a CPU run, they stay in the memory being planned). What the engine holds
(sharded parameters, optimizer state, gather buffers) comes from `engine_state`. Gradients:
engines that keep them whole keep what autograd makes; sharding engines drop each full
gradient as it is accumulated (its shard is a constant).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import torch

from longtrain import torch_private as private
from longtrain.config import PlanConfig, RunConfig
from longtrain.config.rules import check_global_batch, check_plan, validate_run_config
from longtrain.data.batch import PackedBatch
from longtrain.distributed import DistEnv
from longtrain.distributed.parallelize import apply_model_stack, build_parallel_dims, step_context
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


def _flash_bwd_workspace(func, args, kwargs) -> int:
    """flash-attn's backward accumulates dq in float32 ([T, H, D]) and keeps a float32 [H, T]
    row statistic."""
    q = args[3]
    return q.numel() * 4 + q.shape[0] * q.shape[1] * 4


def _triton_loss_workspace(func, args, kwargs) -> int:
    """The triton tiled loss: one [t, V] float32 tile, and its 16-bit copy for 16-bit hidden."""
    hidden, weight, tile_tokens = args[0], args[1], args[5]
    tile = min(int(tile_tokens), hidden.shape[0]) * weight.shape[0]
    return tile * (4 + (hidden.element_size() if hidden.element_size() < 4 else 0))


def workspace_rules(device: str) -> dict:
    rules = {
        "longtrain::linear_cross_entropy_fwd": _loss_workspace,
        "longtrain::triton_linear_ce": _triton_loss_workspace,
    }
    if device == "cuda":
        rules["longtrain::attn_varlen_bwd"] = _flash_bwd_workspace
    return rules


@dataclass
class StepMemory:
    """Memory of one GPU over one simulated step."""

    seq_len: int
    tokens_per_gpu: int  # T_local of one micro-batch
    peak_bytes: int  # tensors on the GPU at the step's high-water mark
    breakdown: dict  # category -> bytes at that mark
    peak_at: str  # forward | loss forward | loss backward | backward | optimizer step
    host_bytes: int  # offloaded activations (at their most) + engine state on the host
    engine: str = ""
    phases: dict = field(default_factory=dict)  # part of the step -> its high, bytes

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
        ring = p.ring if p.method in ("ring", "usp") else 1
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

    def extrapolate(self, other: _Dynamic, steps: int) -> _Dynamic:
        """self + steps x (other - self), part by part: one more block per step. Blocks are
        identical, so each part's high grows by the same amount per block (its position
        within the part does not move); the step's peak is the largest part."""

        def lin(a: int, b: int) -> int:
            return a + steps * (b - a)

        highs = {}
        for label, (b_bytes, b_split) in other.highs.items():
            a_bytes, a_split = self.highs.get(label, (b_bytes, b_split))
            split = {c: lin(a_split[c], b_split[c]) for c in CATEGORIES}
            highs[label] = (lin(a_bytes, b_bytes), split)
        return _Dynamic(
            highs, lin(self.grads_after, other.grads_after), lin(self.host_peak, other.host_peak)
        )

    def peak(self) -> tuple[int, dict, str]:
        label = max(self.highs, key=lambda k: self.highs[k][0])
        return self.highs[label][0], self.highs[label][1], label


class Planner:
    """Simulates steps of `cfg` on `plan.world_size` fake GPUs. Use as a context manager:
    it owns a fake process group (one per process at a time) and the fake models.

    Blocks are identical, so a step of N > 3 blocks is simulated with 2 and 3 blocks and
    extrapolated linearly in the number of blocks (every block adds the same saved state,
    the peak stays at the same point of the step; `exact_layers=True` simulates all N)."""

    def __init__(self, cfg: RunConfig, plan: PlanConfig, exact_layers: bool = False) -> None:
        if cfg.model.name == "hf":
            raise ValueError(
                "the planner simulates longtrain's own Transformer; for a model=hf run, plan "
                "the same shapes with model=llama3_8b-style fields (dim, n_layers, heads, ffn_dim)"
            )
        check_plan(plan)
        self.cfg, self.plan = cfg, plan
        self.world_size, self.ulysses, self.ring = resolve_world(cfg, plan)
        validate_run_config(cfg, self.world_size)
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
        n = cfg.model.n_layers
        self.probe_layers = [n] if exact_layers or n <= 3 else [2, 3]
        self.kernel_backend = _kernel_backend(cfg, plan)
        self.dims = None
        self._stack = contextlib.ExitStack()

    def _micro_batches(self) -> tuple[int, int]:
        check_global_batch(self.cfg.train.global_batch, self.dp)
        per_rank = self.cfg.train.global_batch // self.dp
        micro = self.cfg.train.micro_batch or per_rank
        if per_rank % micro:
            raise ValueError(
                f"train.micro_batch={micro} must divide the {per_rank} sequences per rank"
            )
        return micro, per_rank // micro

    # ------------------------------------------------------------------ lifetime
    def __enter__(self) -> Planner:
        self._stack.enter_context(private.fake_process_group(self.world_size))
        try:
            # The trainer's own layout code, on a fake process group playing rank 0.
            env = DistEnv(rank=0, world_size=self.world_size, local_rank=0, device=DEVICE)
            self.dims = build_parallel_dims(self.cfg, env)
            self.ctx = step_context(self.cfg, env, self.dims, pad_id=0)
            self.fake = private.fake_mode()
            full = self._build(self.cfg.model.n_layers)
            self.engine: EngineState = engine_state(self.cfg, full, self.world_size)
            self.param_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
            self.largest_param = max(p.numel() for p in full.parameters())
            n = self.cfg.model.n_layers
            self.probes = {k: full if k == n else self._build(k) for k in self.probe_layers}
        except BaseException:
            self._stack.close()
            raise
        return self

    def _build(self, n_layers: int):
        """A fake model of `n_layers` blocks, parallelised as `parallelize` does it up to the
        sharding engine (`apply_model_stack`)."""
        from longtrain.model.llama import Transformer

        model_cfg = dataclasses.replace(
            self.cfg.model, n_layers=n_layers, kernel_backend=self.kernel_backend
        )
        with self.fake, _default_dtype(self.cfg.model.dtype):
            model = Transformer(model_cfg)
            apply_model_stack(model, self.dims, self.cfg, offload_device=self._offload_device())
        return model

    def _offload_device(self) -> str:
        """Offloaded block inputs leave a GPU ("meta": host memory, counted apart); a CPU
        run offloads into the very memory it computes in, so they stay counted."""
        return HOST.type if self.plan.device == "cuda" else DEVICE.type

    def __exit__(self, *exc) -> None:
        self._stack.close()

    # ------------------------------------------------------------------ one step
    def seq_multiple(self) -> int:
        return self.dims.seq_multiple() if self.dims is not None else 1

    def measure(self, seq_len: int) -> StepMemory:
        """Peak memory of one GPU for micro-batches of `micro_batch` x `seq_len` tokens."""
        if self.dims is not None:
            self.dims.validate(self.cfg.model.n_heads, self.cfg.model.n_kv_heads, seq_len)
        batch = self._batch(seq_len)
        runs = [self._simulate(self.probes[k], batch) for k in self.probe_layers]
        dyn = runs[0]
        if len(runs) == 2:
            dyn = runs[0].extrapolate(runs[1], self.cfg.model.n_layers - self.probe_layers[0])
        return self._result(seq_len, int(batch.tokens.numel()), dyn)

    def _simulate(self, model, local: LocalBatch) -> _Dynamic:
        tracker = MemoryTracker(DEVICE, workspace_rules(self.plan.device))
        host = MemoryTracker(HOST)  # offloaded activations
        handles = self._grad_hooks(model, tracker)
        handles.append(model.norm.register_forward_hook(_loss_phase(tracker)))
        try:
            with self.fake, private.kernels_compile_path(), host, tracker:
                self._prefill_grads(model)
                tracker.phase, tracker.label = "activations", "forward"
                loss = forward_loss(model, local, self.ctx)  # the trainer's own forward
                tracker.phase, tracker.label = "loss", "loss backward"
                loss.backward()
                del loss
                grads_after = tracker.by_category["gradients"]
        finally:
            self._shards = {}
            for h in handles:
                h.remove()
            for p in model.parameters():
                p.grad = None
        return _Dynamic(dict(tracker.label_peaks), grads_after, host.peak)

    def _kernel_paths(self):
        stack = contextlib.ExitStack()
        stack.enter_context(private.kernels_compile_path())
        if self.kernel_backend == "triton":
            stack.enter_context(private.gpu_kernel_paths())
        return stack

    def _batch(self, seq_len: int) -> LocalBatch:
        """Rank 0's part of one micro-batch of `micro_batch` sequences of `seq_len` tokens (one
        document each), sharded by the trainer's `shard_micro_batch`; real tensors, with the
        attention plans built now (they read values, which fake tensors do not have)."""
        S, T = self.micro_batch, self.micro_batch * seq_len
        mb = PackedBatch(
            tokens=torch.zeros(T, dtype=torch.int64),
            labels=torch.ones(T, dtype=torch.int64),
            position_ids=torch.arange(seq_len).repeat(S),
            cu_seqlens=torch.arange(0, T + 1, seq_len, dtype=torch.int32),
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
        return local

    def _grad_hooks(self, model, tracker: MemoryTracker) -> list:
        """Keep whole gradients where the engine does; otherwise drop each as it is
        accumulated (reduced into the engine's shard), making the shard when the engine makes
        it in the backward (FSDP2) or counting it as a constant (DeepSpeed)."""
        keep_all = self.engine.keep_full_grads
        self._shards = {}  # name -> stand-in of the engine's gradient shard
        handles = []
        for name, p in model.named_parameters():
            keep = keep_all or name in self.engine.full_grad_params
            # With accumulation the shards exist from the micro-batch before (`_result`).
            shard = 0 if self.num_micro > 1 else self.engine.grad_shards.get(name, 0)

            def hook(param, keep=keep, name=name, shard=shard):
                if keep:
                    tracker.relabel(param.grad, "gradients")
                    return
                if shard and name not in self._shards:
                    self._shards[name] = param.grad.new_empty(shard)
                    tracker.relabel(self._shards[name], "gradients")
                param.grad = None

            handles.append(p.register_post_accumulate_grad_hook(hook))
        return handles

    def _accumulates_full_grads(self) -> bool:
        return self.num_micro > 1 and self.engine.keep_full_grads

    def _prefill_grads(self, model) -> None:
        """With gradient accumulation, whole gradients exist before the micro-batch runs."""
        if self._accumulates_full_grads():
            for p in model.parameters():
                p.grad = torch.zeros_like(p)  # counted as a constant (`_result`)

    def _result(self, seq_len: int, t_local: int, dyn: _Dynamic) -> StepMemory:
        constants = self.engine.constants()
        if self._accumulates_full_grads():
            constants["gradients"] += self.param_bytes
        if self.num_micro > 1:
            elem = 8 if self.cfg.model.dtype == "float64" else 4
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
        return StepMemory(
            seq_len=seq_len,
            tokens_per_gpu=t_local,
            peak_bytes=int(peak),
            breakdown={k: int(v) for k, v in breakdown.items()},
            peak_at=where,
            host_bytes=int(dyn.host_peak + self.engine.host),
            engine=self.engine.engine,
            phases=phases,
        )

    def _adam_temp(self) -> int:
        shard = self.world_size if self.engine.engine != "none" else 1
        elem = 8 if self.cfg.model.dtype == "float64" else 4
        return math.ceil(self.largest_param / shard) * elem


def _kernel_backend(cfg: RunConfig, plan: PlanConfig) -> str:
    """The RoPE / RMSNorm / loss backend the planned run resolves `auto` to: triton on CUDA
    (when installed, for the dtypes it takes), else what the config says."""
    from kernels._triton_utils import triton_available

    backend = cfg.model.kernel_backend
    if backend == "auto" and plan.device == "cuda":
        fits = cfg.model.dtype != "float64" and triton_available()
        return "triton" if fits else "torch"
    return backend


def _loss_phase(tracker: MemoryTracker):
    """Forward hook of the final norm: what follows is the loss; the gradient reaching the
    norm's output marks the end of the loss's backward."""

    def hook(module, args, output):
        tracker.phase, tracker.label = "loss", "loss forward"
        if output.requires_grad:
            output.register_hook(lambda grad: _set(tracker, "activations", "backward"))

    return hook


def _set(tracker: MemoryTracker, phase: str, label: str) -> None:
    tracker.phase, tracker.label = phase, label


@contextlib.contextmanager
def _default_dtype(model_dtype: str):
    """Parameters are float32 (the master weights of bf16 runs) or float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if model_dtype == "float64" else torch.float32)
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


__all__ = ["GIB", "Planner", "StepMemory", "resolve_world", "workspace_rules"]
