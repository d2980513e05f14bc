"""The process grid `dp x ring x ulysses`, every rule on degrees, heads and shapes, and the
process groups.

Legend: P = ulysses x ring, the sequence-parallel (SP) size; R = ring; Hq query heads, K KV
heads, T tokens on this rank, D head dim.

The rules live here once: `ParallelDims.validate` applies them to a whole run before any work
starts, and the attention functions call the same functions (`check_ulysses_heads`,
`check_qkv`) so that a direct caller gets the same message.

Rank layout (row-major over the mesh axes ("dp", "ring", "ulysses"), ulysses fastest):

    rank = dp_idx * (ring * ulysses) + ring_idx * ulysses + ulysses_idx

Why this order: Ulysses moves every activation of the attention through all-to-alls, twice
per forward, so its group must sit on the fastest links, i.e. on consecutive ranks, which
torchrun and Slurm place on the same node (NVLink). Ring moves only K/V blocks point to
point and overlaps them with compute, so it tolerates the slower links across nodes. DP is
outermost: its traffic (gradient reduction, FSDP gathers) happens once per layer per step.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

AXES = ("dp", "ring", "ulysses")  # mesh axis names, outermost first


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _kv_heads_fit(num_kv_heads: int, ulysses: int) -> bool:
    """KV heads split evenly over `ulysses` ranks (K % u == 0) or are replicated a whole
    number of times (u % K == 0)."""
    return num_kv_heads % ulysses == 0 or ulysses % num_kv_heads == 0


def valid_ulysses_degrees(num_heads: int, num_kv_heads: int) -> list[int]:
    """Ulysses degrees u that split `num_heads` query heads evenly and whose KV heads either
    split evenly (K % u == 0) or are replicated a whole number of times (u % K == 0)."""
    return [u for u in _divisors(num_heads) if _kv_heads_fit(num_kv_heads, u)]


def check_ulysses_heads(num_heads: int, num_kv_heads: int, ulysses: int) -> None:
    """ValueError unless Ulysses over `ulysses` ranks splits the query heads and splits or
    replicates the KV heads; the message lists the valid degrees."""
    if num_heads % ulysses == 0 and _kv_heads_fit(num_kv_heads, ulysses):
        return
    u = ulysses
    valid = ", ".join(map(str, valid_ulysses_degrees(num_heads, num_kv_heads)))
    if num_heads % u:
        raise ValueError(
            f"ulysses={u} needs query heads ({num_heads}) divisible by {u}; valid degrees: {valid}"
        )
    raise ValueError(
        f"ulysses={u} needs KV heads ({num_kv_heads}) divisible by {u}, or {u} divisible "
        f"by KV heads ({num_kv_heads}) so that each KV head is replicated a whole number "
        f"of times; valid degrees: {valid}"
    )


def kv_heads_per_rank(num_kv_heads: int, ulysses: int) -> int:
    """KV heads a rank holds after the Ulysses exchange: K / u, or 1 when the K heads are
    replicated (u % K == 0: each goes to the u / K ranks whose query heads use it)."""
    return num_kv_heads // ulysses if num_kv_heads % ulysses == 0 else 1


def check_qkv(what: str, q_THD, k_TKD, v_TKD) -> None:
    """ValueError unless q is [T, Hq, D] and k, v are [T, K, D] with the same T (`what`
    names the caller in the message)."""
    if q_THD.dim() != 3 or k_TKD.shape != v_TKD.shape or k_TKD.shape[0] != q_THD.shape[0]:
        raise ValueError(
            f"{what} needs q [T, Hq, D] and k, v [T, K, D] with the same T, got "
            f"{tuple(q_THD.shape)}, {tuple(k_TKD.shape)}, {tuple(v_TKD.shape)}"
        )


class ParallelDims:
    """The grid `dp x ring x ulysses` over `world_size` ranks.

    `dp` defaults to `world_size // (ulysses * ring)`. Construction checks the grid;
    `validate` checks it against a model and sequence length; `build_mesh` creates the
    DeviceMesh and the process groups (collective: every rank must call it).
    """

    def __init__(self, world_size: int, ulysses: int = 1, ring: int = 1, dp: int | None = None):
        self.world_size = _positive_int("world_size", world_size)
        self.ulysses = _positive_int("ulysses", ulysses)
        self.ring = _positive_int("ring", ring)
        sp = self.ulysses * self.ring
        if dp is None:
            if world_size % sp:
                raise ValueError(
                    f"world size {world_size} is not divisible by ulysses x ring = "
                    f"{ulysses} x {ring} = {sp}; use a world size that is a multiple of {sp}, "
                    f"or degrees whose product divides {world_size} "
                    f"(divisors: {', '.join(map(str, _divisors(world_size)))})"
                )
            dp = world_size // sp
        self.dp = _positive_int("dp", dp)
        if self.dp * sp != world_size:
            raise ValueError(
                f"world size {world_size} != dp x ulysses x ring = {self.dp} x {ulysses} x "
                f"{ring} = {self.dp * sp}; leave dp unset (it defaults to world size / "
                f"(ulysses x ring)) or change the degrees"
            )
        self._mesh: DeviceMesh | None = None
        self._sp_mesh: DeviceMesh | None = None
        self._dp_sp_mesh: DeviceMesh | None = None
        # Another grid over the same SP ranks (same sp_rank order) whose layout adaptive
        # placement may also split documents with: parallel=auto's Ulysses beside its ring.
        self.alternate: ParallelDims | None = None

    # ------------------------------------------------------------------ rules
    @property
    def sp_size(self) -> int:
        """P = ulysses x ring, the number of ranks that share one sequence."""
        return self.ulysses * self.ring

    def seq_multiple(self) -> int:
        """Sequence lengths must be multiples of this: 2 x ring x ulysses with a ring (zigzag
        halves per rank), ulysses alone otherwise."""
        return 2 * self.ring * self.ulysses if self.ring > 1 else self.ulysses

    def validate(self, num_heads: int, num_kv_heads: int, seq_len: int | None = None) -> None:
        """Check the grid against a model (query and KV heads) and a sequence length.

        Raises ValueError naming the numbers and the valid choices, before any work starts.
        """
        _positive_int("num_heads", num_heads)
        _positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(
                f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads}); "
                f"valid KV head counts: {', '.join(map(str, _divisors(num_heads)))}"
            )
        check_ulysses_heads(num_heads, num_kv_heads, self.ulysses)
        if seq_len is not None:
            _positive_int("seq_len", seq_len)
            m = self.seq_multiple()
            if seq_len % m:
                lo, hi = (seq_len // m) * m, (seq_len // m + 1) * m
                why = (
                    f"2 x ring x ulysses = 2 x {self.ring} x {self.ulysses} = {m} (zigzag gives "
                    f"each ring rank two halves)"
                    if self.ring > 1
                    else f"ulysses ({self.ulysses})"
                )
                nearest = f"{lo} or {hi}" if lo > 0 else f"{hi}"
                raise ValueError(
                    f"seq_len {seq_len} must be divisible by {why}; nearest valid: {nearest}"
                )

    # ------------------------------------------------------------------ mesh
    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create the 3-D DeviceMesh ("dp", "ring", "ulysses") and its groups (collective)."""
        if not dist.is_initialized():
            raise RuntimeError("build_mesh needs torch.distributed to be initialised first")
        if dist.get_world_size() != self.world_size:
            raise ValueError(
                f"ParallelDims was made for world size {self.world_size} but the process "
                f"group has {dist.get_world_size()} ranks"
            )
        mesh = init_device_mesh(
            device_type, (self.dp, self.ring, self.ulysses), mesh_dim_names=AXES
        )
        # DeviceMesh._flatten is private API; it is used here and nowhere else.
        self._sp_mesh = mesh["ring", "ulysses"]._flatten("sp")
        self._dp_sp_mesh = mesh["dp", "ring", "ulysses"]._flatten("dp_sp")
        self._mesh = mesh
        return mesh

    def _need_mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("ParallelDims.build_mesh(device_type) must be called first")
        return self._mesh

    @property
    def mesh(self) -> DeviceMesh:
        return self._need_mesh()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """Ranks that see different batches (same SP coordinate)."""
        return self._need_mesh().get_group("dp")

    @property
    def ring_group(self) -> dist.ProcessGroup:
        return self._need_mesh().get_group("ring")

    @property
    def ulysses_group(self) -> dist.ProcessGroup:
        return self._need_mesh().get_group("ulysses")

    @property
    def sp_group(self) -> dist.ProcessGroup:
        """Ranks that share one sequence: ring x ulysses, ulysses fastest."""
        self._need_mesh()
        return self._sp_mesh.get_group()

    @property
    def dp_sp_mesh(self) -> DeviceMesh:
        """1-D mesh over dp x sp (every rank of the grid): SP ranks hold the same weights and
        see different tokens, so gradients (and FSDP sharding) span dp x sp."""
        self._need_mesh()
        return self._dp_sp_mesh

    @property
    def dp_sp_group(self) -> dist.ProcessGroup:
        return self.dp_sp_mesh.get_group()

    @property
    def dp_rank(self) -> int:
        return self._need_mesh().get_local_rank("dp")

    @property
    def ring_rank(self) -> int:
        return self._need_mesh().get_local_rank("ring")

    @property
    def ulysses_rank(self) -> int:
        return self._need_mesh().get_local_rank("ulysses")

    @property
    def sp_rank(self) -> int:
        """Rank within the SP group: ring_rank * ulysses + ulysses_rank."""
        return self.ring_rank * self.ulysses + self.ulysses_rank

    def __repr__(self) -> str:
        return (
            f"ParallelDims(world_size={self.world_size}: dp={self.dp} x ring={self.ring} x "
            f"ulysses={self.ulysses})"
        )


__all__ = [
    "AXES",
    "ParallelDims",
    "check_qkv",
    "check_ulysses_heads",
    "kv_heads_per_rank",
    "valid_ulysses_degrees",
]
