"""Communication primitives of the SP methods: each takes its process group first, records
its bytes into an optional CommStats, and is the only place that calls torch.distributed.

Legend: P ranks in the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.comm_stats import CommStats, record

# torch >= 2.10 names these *_single; older releases only have the *_tensor names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_to_all(group, out: torch.Tensor, inp: torch.Tensor, stats: CommStats | None) -> None:
    """Equal-split all-to-all: chunk j of `inp` (dim 0 split in P) goes to rank j; chunk i of
    `out` comes from rank i. Both contiguous, same shape."""
    p = dist.get_world_size(group)
    off_rank = inp.numel() * inp.element_size() * (p - 1) // p
    dist.all_to_all_single(out, inp, group=group)
    record(stats, "all_to_all", off_rank, off_rank)


def all_gather(group, out: torch.Tensor, inp: torch.Tensor, stats: CommStats | None) -> None:
    """`out` ([P * n, ...]) = every rank's `inp` ([n, ...]) in rank order (dim 0 concatenated)."""
    p = dist.get_world_size(group)
    nbytes = inp.numel() * inp.element_size() * (p - 1)
    _all_gather_single(out, inp, group=group)
    record(stats, "all_gather", nbytes, nbytes)


def reduce_scatter(group, out: torch.Tensor, inp: torch.Tensor, stats: CommStats | None) -> None:
    """`out` ([n, ...]) = sum over ranks of chunk `rank` of `inp` ([P * n, ...])."""
    p = dist.get_world_size(group)
    nbytes = out.numel() * out.element_size() * (p - 1)
    _reduce_scatter_single(out, inp, group=group)
    record(stats, "reduce_scatter", nbytes, nbytes)


class RingComm:
    """Point-to-point exchange around a ring, with a strict lifecycle:

        recv = comm.send_recv(t)   # queue: send t to the next rank, receive from the previous
        comm.commit()              # issue every queued op as one batch_isend_irecv
        ...compute...              # (the transfer overlaps this on GPU)
        comm.wait()                # recv is now valid; the comm is idle again

    Misuse raises RuntimeError: send_recv while a batch is in flight, commit with nothing
    queued, wait without commit, or a new lifecycle while one is unfinished (`assert_idle`).
    `tag` separates streams of messages between the same two ranks (gloo matches by tag).
    """

    def __init__(self, group, stats: CommStats | None = None, tag: int = 0):
        self.group = group
        self.stats = stats
        self.tag = tag
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.next = (self.rank + 1) % self.size
        self.prev = (self.rank - 1) % self.size
        self._ops: list[dist.P2POp] = []
        self._bytes = 0
        self._reqs: list | None = None

    def send_recv(self, to_send: torch.Tensor, recv_buf: torch.Tensor | None = None):
        """Queue sending `to_send` to the next rank and receiving into `recv_buf` (fresh when
        None) from the previous one; returns the receive buffer (valid after `wait`)."""
        if self._reqs is not None:
            raise RuntimeError("RingComm.send_recv while a batch is in flight: call wait() first")
        if not to_send.is_contiguous():
            raise RuntimeError("RingComm.send_recv needs a contiguous tensor to send")
        recv = torch.empty_like(to_send) if recv_buf is None else recv_buf
        if recv.shape != to_send.shape or recv.dtype != to_send.dtype:
            raise RuntimeError(
                f"RingComm: receive buffer {tuple(recv.shape)} {recv.dtype} does not match "
                f"the sent tensor {tuple(to_send.shape)} {to_send.dtype}"
            )
        self._ops.append(
            dist.P2POp(dist.isend, to_send, group=self.group, group_peer=self.next, tag=self.tag)
        )
        self._ops.append(
            dist.P2POp(dist.irecv, recv, group=self.group, group_peer=self.prev, tag=self.tag)
        )
        self._bytes += to_send.numel() * to_send.element_size()
        return recv

    def commit(self) -> None:
        """Issue the queued sends and receives as one batch."""
        if self._reqs is not None:
            raise RuntimeError("RingComm.commit twice without wait()")
        if not self._ops:
            raise RuntimeError("RingComm.commit with nothing queued: call send_recv first")
        self._reqs = dist.batch_isend_irecv(self._ops)
        record(self.stats, "p2p", self._bytes, self._bytes)
        self._ops, self._bytes = [], 0

    def wait(self) -> None:
        """Block until the committed batch is done."""
        if self._reqs is None:
            raise RuntimeError("RingComm.wait without commit()")
        for req in self._reqs:
            req.wait()
        self._reqs = None

    def assert_idle(self) -> None:
        """Raise unless every queued op was committed and waited for."""
        if self._ops or self._reqs is not None:
            raise RuntimeError(
                f"RingComm left busy: {len(self._ops)} ops queued, "
                f"{'a batch' if self._reqs is not None else 'nothing'} in flight"
            )


__all__ = ["RingComm", "all_gather", "all_to_all", "reduce_scatter"]
