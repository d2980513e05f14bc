"""The run schema: typed dataclasses registered in Hydra's ConfigStore.

YAML under `configs/` only selects and overrides these; an unknown key anywhere is an error
(the schema is a structured config). Each field is documented beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EMBEDDED_STORE_DIR = "data_cache/stdlib-byte"  # the embedded corpus' store (default data)

# The choices of the string fields below (checked by longtrain.config.rules; the parallel
# methods are parallel.METHODS / RING_IMPLS, checked by the parallel package itself).
DTYPES = ("float32", "bfloat16", "float64")
PACKINGS = ("concat_chunk", "best_fit", "decomposition")
CURRICULA = ("uniform", "grow_linear", "grow_p2")
LOSS_WEIGHTINGS = ("token", "per_document")
TRAIN_ON = ("assistant", "all")  # which tokens of chat / prompt-completion records train
SCHEDULES = ("cosine", "constant")
AC_MODES = ("none", "full", "selective")
ENGINES = ("fsdp2", "deepspeed", "none")
ZERO_STAGES = (1, 2, 3)
WANDB_MODES = ("disabled", "offline", "online")
PLAN_DEVICES = ("cuda", "cpu")


@dataclass
class ModelConfig:
    name: str = "tiny"  # label only; the shape fields below define the model
    vocab_size: int = 0  # 0: take it from the tokenizer of the token store
    dim: int = 128  # model (hidden) width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); divides n_heads
    head_dim: int = 0  # 0: dim // n_heads
    ffn_dim: int = 352  # SwiGLU hidden width
    rope_theta: float = 10000.0  # RoPE base; positions restart at every document
    norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the output projection
    init_std: float = 0.02  # normal init of weights; output projections scaled by depth
    # float32 | bfloat16 (bf16 compute and activations over fp32 master weights and optimizer
    # state: longtrain/distributed/precision.py) | float64 (CPU, the exact reference path)
    dtype: str = "float32"
    attn_backend: str = "auto"  # attention: auto | torch | triton | flash_attn | torch_varlen
    kernel_backend: str = "auto"  # RoPE / RMSNorm / loss kernels: auto | torch | triton
    path: str = ""  # Hugging Face model directory (model=hf only)


@dataclass
class StageConfig:
    steps: int = 1  # optimizer steps in this stage
    seq_len: int = 512  # tokens per sequence in this stage
    rope_theta: float = 10000.0  # RoPE base in this stage (context extension raises it)
    global_batch: int = 0  # sequences per step; 0: keep train.global_batch x data.seq_len tokens


@dataclass
class DataConfig:
    # Where the tokens come from (see longtrain/data/setup.py): with a source named, the store
    # at store_dir is built from it (or reused, or rebuilt when its inputs changed); with none,
    # the store at store_dir is used as it is, except the embedded corpus' own store
    # (EMBEDDED_STORE_DIR), which is built from the standard library on first use.
    source: str = ""  # "" (none named) | stdlib | dir:PATH | jsonl:PATH (a file / line a document)
    store_dir: str = EMBEDDED_STORE_DIR  # token store location
    tokenizer: str = ""  # "": the store's own (byte when building) | byte | local HF tokenizer dir
    limit_docs: int = 0  # 0: all documents; else the first N (deterministic order)
    replace_store: bool = False  # allow replacing a store at store_dir built from another source
    seq_len: int = 512  # tokens per packed sequence
    packing: str = "best_fit"  # concat_chunk | best_fit | decomposition (variable length)
    shuffle: bool = True  # shuffle sequences each epoch (seeded by train.seed)
    # Dataset decomposition (packing=decomposition): buckets of 2^i tokens, i in [min, max];
    # every step trains train.global_batch x seq_len tokens from one bucket.
    min_log2: int = 6  # shorter remainders are dropped (and counted)
    max_log2: int = 0  # 0: log2(seq_len); longer documents become several max-size chunks
    curriculum: str = "uniform"  # uniform | grow_linear | grow_p2 (short buckets first)
    curriculum_cycles: int = 1  # the curriculum repeats this many times per epoch
    # Context-length stages (override seq_len while they last), e.g. data.stages=
    # '[{steps:100,seq_len:4096,rope_theta:5e5},{steps:50,seq_len:16384,rope_theta:4e6}]'
    stages: list[StageConfig] = field(default_factory=list)
    loss_weighting: str = "token"  # token (each trained token equal) | per_document (LongAlign)
    # JSONL chat ({"messages"}) and {"prompt", "completion"} records: train on the assistant
    # turns / completions only (a loss mask in the store) or on every token.
    train_on: str = "assistant"  # assistant | all
    # Documents held out for evaluation (train.eval_every), chosen from the store alone; or
    # a source of its own (every document evaluated, never trained), prepared into
    # val_store_dir ("": store_dir + "-val") with the training store's tokenizer.
    val_fraction: float = 0.0
    val_source: str = ""  # "" | stdlib | dir:PATH | jsonl:PATH
    val_store_dir: str = ""
    balance: bool = True  # assign sequences to dp ranks balancing attention cost
    prefetch: int = 1  # steps built ahead in a background thread (0: none)


@dataclass
class ParallelConfig:
    # none | ulysses | ring | usp | auto (per step: which documents stay whole on one rank,
    # and ulysses, ring zigzag or ring all-gather for the rest, over `ring` ranks)
    method: str = "none"
    ulysses: int = 1  # Ulysses (all-to-all over heads) degree; 0: all ranks not used by ring
    ring: int = 1  # Ring attention degree; 0: all ranks not used by ulysses
    ring_impl: str = "zigzag"  # zigzag (P2P ring, causal balance) | allgather (many short docs)
    # Keep the method but place short documents whole on one rank (parallel/adaptive.py);
    # always on for method=auto.
    adaptive: bool = False
    adaptive_threshold: int = 0  # documents up to this many tokens stay whole; 0: cost model
    # A rank may hold up to 1 + this times the tokens of the fixed layout (the planner plans
    # that worst case): room to keep documents whole without exact token balance.
    adaptive_slack: float = 0.25
    # The cost model (parallel/adaptive_cost.py): one GPU's sustained TFLOP/s, one link's
    # GB/s and latency; measured at start-up when `calibrate` (the values here are the
    # fallback if that fails or takes longer than calibrate_timeout_s).
    cost_tflops: float = 400.0
    cost_link_gbps: float = 100.0
    cost_latency_us: float = 20.0
    calibrate: bool = True
    calibrate_timeout_s: float = 30.0


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10  # linear warmup from 0
    schedule: str = "cosine"  # cosine | constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only, not norms or biases
    grad_clip: float | None = 1.0  # max global grad norm; 0 or null: no clipping


@dataclass
class MemoryConfig:
    mlp_tiles: int = 1  # run each MLP over this many sequence tiles (1: off; 0: from budget)
    mlp_tile_budget_mib: int = 256  # with mlp_tiles=0: largest MLP intermediate per tile
    loss_tile_tokens: int = 4096  # tokens per tile of the linear + cross-entropy
    activation_checkpoint: str = "none"  # none | full (per block) | selective (keep attention)
    # Checkpointed block inputs that wait in (pinned) host memory instead of on the GPU:
    # false / 0 none; true every block; an int n the first n blocks (their inputs wait the
    # longest, and the backward reaches them last, so their prefetch has the most time); a
    # float in [0, 1] that fraction of the blocks, rounded to the nearest count, halves up
    # (0.5 of 5 blocks: 3; 1.0 every block). Needs activation_checkpoint;
    # `longtrain.config.rules.offloaded_blocks` resolves it to a count.
    offload_activations: Any = False
    cpu_offload: bool = False  # fsdp2: parameters, gradients and optimizer state on CPU


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3  # ZeRO stage 1 | 2 | 3
    offload_optimizer: bool = False  # optimizer state and step on CPU
    offload_params: bool = False  # ZeRO-3 parameters on CPU


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    seed: int = 0  # one seed for init, data order and every RNG
    global_batch: int = 8  # sequences per optimizer step, summed over data-parallel ranks
    micro_batch: int = 0  # sequences (of data.seq_len tokens) per forward; 0: all (no accumulation)
    ckpt_every: int = 0  # save a checkpoint every N steps (0: only at the end if ckpt_final)
    ckpt_final: bool = True  # save a checkpoint after the last step
    keep_last: int = 2  # verified checkpoints to keep (0: all); a failing one never counts
    ckpt_checksums: bool = True  # sha256 of every checkpoint file, written at save, checked at load
    ckpt_async: bool = False  # DCP async_save: stage to host, write while training goes on
    skip_nonfinite: bool = False  # a non-finite loss/grad norm skips the update (default: stop)
    resume: str = "none"  # none | auto (newest complete checkpoint in the run dir) | PATH
    eval_every: int = 0  # evaluate the held-out documents every N steps (0: never)
    eval_sequences: int = 0  # held-out sequences of data.seq_len evaluated (0: global_batch)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    engine: str = "fsdp2"  # fsdp2 (when world size > 1) | deepspeed | none (replicas)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    log_every: int = 1  # console/wandb cadence (metrics.jsonl gets every step)
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: known GPUs only, else no MFU
    dist_timeout_s: int = 600  # collective timeout
    heartbeat_s: int = 60  # while a step runs longer, each rank prints a line this often (0: off)
    hang_timeout_s: int = 0  # exit a rank whose step makes no progress for N s (0: off)
    compile: bool = False  # torch.compile each block


@dataclass
class WandbConfig:
    mode: str = "offline"  # disabled | offline | online
    project: str = "longtrain"
    entity: str = ""  # empty: wandb's default
    group: str = ""  # empty: the experiment name
    name: str = ""  # empty: the run directory's name


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # tqdm progress line on rank 0
    plot: bool = True  # write metrics.png at the end


@dataclass
class PlanConfig:
    gpu_mem_gib: float = 80.0  # memory of one GPU, GiB; the plan must fit in it
    reserve_gib: float = 2.0  # kept free of tensors: CUDA context, NCCL, allocator slack
    world_size: int = 0  # GPUs of the planned run; 0: ulysses x ring (data parallel 1)
    device: str = "cuda"  # cuda: GPU kernels' workspaces | cpu: our CPU kernels' (validation)
    search: bool = True  # also find the longest data.seq_len that fits (max_seq_len)
    seq_len_step: int = 1024  # granularity of max_seq_len (rounded to the layout's multiple)
    max_seq_len: int = 1 << 26  # upper end of the search
    # Host memory of one node, GiB (default 1.9e12 bytes: ALST's 8-GPU H100 node); the
    # min(world size, gpus_per_node) GPUs of a node share it.
    host_mem_gib: float = 1.9e12 / (1 << 30)
    gpus_per_node: int = 8  # GPUs of one node; divides the world size when it is larger
    # Kernels of the planned run where the model config says `auto` (a plan is for the target,
    # whatever is importable here): attention flash_attn | torch_varlen | triton | torch,
    # RoPE / RMSNorm / loss triton | torch. plan.device=cpu and float64 runs plan the torch
    # kernels.
    attn_backend: str = "flash_attn"
    kernel_backend: str = "triton"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)  # python -m longtrain.plan
    experiment: str = "default"  # name used for grouping runs (wandb group, run labels)


__all__ = [
    "AC_MODES",
    "CURRICULA",
    "DTYPES",
    "EMBEDDED_STORE_DIR",
    "ENGINES",
    "LOSS_WEIGHTINGS",
    "TRAIN_ON",
    "PACKINGS",
    "PLAN_DEVICES",
    "SCHEDULES",
    "WANDB_MODES",
    "ZERO_STAGES",
    "DataConfig",
    "DeepSpeedConfig",
    "LoggingConfig",
    "MemoryConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "PlanConfig",
    "RunConfig",
    "StageConfig",
    "TrainConfig",
    "WandbConfig",
]
