"""Which tokens each sequence-parallel rank holds: pure index math, no communication.

Legend: T tokens of the whole (packed) micro-batch, P = U R SP ranks, R ring degree, U Ulysses
degree, N documents, L_d one document's length, c_d its zigzag chunk length, o_d its first
position on a ring rank, T_R tokens on one ring rank (the sequence that a Ulysses group
gathers), T_local tokens on one SP rank (T_R / U).

`SPLayout` combines two splits:
- contiguous (inside a Ulysses group, and the whole layout when R == 1): Ulysses rank u holds
  tokens [u T_R/U, (u+1) T_R/U) of its ring rank's T_R tokens (attention sees all of them
  after the all-to-all);
- per-document zigzag (over the ring, R > 1): every document is cut into 2R chunks (padded to
  a multiple of 2R) and ring rank r holds chunks r and 2R-1-r of every document, so that
  under causal attention every rank does the same work on every document (early chunks are
  cheap, late ones dear). 4 ring ranks over one document of tokens 0..7: rank 0 holds
  [0, 7], rank 1 [1, 6], rank 2 [2, 5], rank 3 [3, 4].

Padding is never attended to by real tokens: within each document the padding forms its own
attention document (it attends only to itself), it gets label -100 and weight 0, and it is
counted (`num_padding`). Index tensors use -1 for padding.
"""

from __future__ import annotations

import torch


def ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(s, s + l) over (s, l): the index of many segments, vectorised."""
    starts, lengths = starts.long(), lengths.long()
    total = int(lengths.sum())
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    excl = torch.cumsum(lengths, 0) - lengths
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return torch.arange(total) - excl[seg] + starts[seg]


def doc_lengths(cu_seqlens_N1: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Document lengths ([N], int64) from cu_seqlens ([N + 1]); checks it covers num_tokens."""
    cu = cu_seqlens_N1.detach().to("cpu", torch.long)
    if cu.dim() != 1 or len(cu) < 1 or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must be 1-D and start at 0, got {cu.tolist()[:8]}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    if int(cu[-1]) != num_tokens:
        raise ValueError(
            f"cu_seqlens ends at {int(cu[-1])} but the micro-batch has {num_tokens} tokens; "
            f"every token must belong to a document"
        )
    return lengths


class SPLayout:
    """The token layout of one packed micro-batch over `ring x ulysses` SP ranks.

    N' documents: the non-empty documents of `cu_seqlens_N1` plus, when needed, a trailing
    padding document; the per-document tensors below are [N'].

    ring == 1: the sequence stays in order, a padding document at the end makes T a multiple
    of `ulysses`, and SP rank u holds a contiguous slice.
    ring > 1: per-document zigzag over the ring: document d (length L_d) is padded to
    2R c_d tokens (c_d = ceil(L_d / 2R)); ring rank r holds, for every document in order,
    chunk r then chunk 2R-1-r (its "front" and "back" chunks). A trailing all-padding
    document of 2R m tokens is added when needed so that T_R is a multiple of `ulysses`.
    Within a ring rank's T_R tokens, Ulysses rank u holds a contiguous slice.

    Every ring rank's layout has the same shape (the same c_d), so K/V blocks rotate as
    equal-size tensors. All tensors here are int64 on the CPU.
    """

    def __init__(self, cu_seqlens_N1: torch.Tensor, num_tokens: int, ring: int, ulysses: int):
        if ring < 1 or ulysses < 1:
            raise ValueError(f"ring ({ring}) and ulysses ({ulysses}) must be >= 1")
        lengths = doc_lengths(cu_seqlens_N1, num_tokens)
        keep = lengths > 0
        self.ring, self.ulysses, self.num_tokens = ring, ulysses, num_tokens
        starts = cu_seqlens_N1.detach().to("cpu", torch.long)[:-1][keep]
        lengths = lengths[keep]
        if ring == 1:
            chunk = lengths.clone()  # unused "chunks": the document stays whole
            pad = -num_tokens % ulysses
            padded = lengths.clone()
        else:
            chunk = -(-lengths // (2 * ring))
            t_ring = int(2 * chunk.sum())
            # Smallest m with (t_ring + 2m) % ulysses == 0 (t_ring is even, so one exists).
            pad = next(m for m in range(ulysses) if (t_ring + 2 * m) % ulysses == 0)
            padded = 2 * ring * chunk
        if pad:
            starts = torch.cat([starts, torch.tensor([num_tokens])])
            lengths = torch.cat([lengths, torch.tensor([0])])
            chunk = torch.cat([chunk, torch.tensor([pad])])
            padded = torch.cat([padded, torch.tensor([pad if ring == 1 else 2 * ring * pad])])
        self.doc_start = starts  # [N'] first token of each document in the original order
        self.real_len = lengths  # [N'] L_d (0 for the trailing padding document)
        self.chunk = chunk  # [N'] c_d (ring > 1)
        self.padded_len = padded  # [N'] L_d plus its padding
        self.padded_start = torch.cumsum(padded, 0) - padded  # [N'] in the padded sequence
        slab = 2 * chunk if ring > 1 else padded  # tokens of document d on one ring rank
        self.local_start = torch.cumsum(slab, 0) - slab  # [N'] o_d on a ring rank
        self.slab = slab
        self.ring_tokens = int(slab.sum())  # T_R
        self.local_tokens = self.ring_tokens // ulysses  # T_local

    # ------------------------------------------------------------- per ring rank
    def _check_ring_rank(self, ring_rank: int) -> None:
        if not 0 <= ring_rank < self.ring:
            raise ValueError(f"ring rank {ring_rank} is outside 0..{self.ring - 1}")

    def doc_pos(self, ring_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(doc_T_R, pos_T_R): document and position within the padded document of each of
        the ring rank's T_R tokens, in its local order."""
        self._check_ring_rank(ring_rank)
        n = len(self.slab)
        doc = torch.repeat_interleave(torch.arange(n), self.slab)
        t = torch.arange(self.ring_tokens) - self.local_start[doc]
        if self.ring == 1:
            return doc, t
        c = self.chunk[doc]
        back = 2 * self.ring - 1 - ring_rank
        pos = torch.where(t < c, ring_rank * c + t, back * c + t - c)
        return doc, pos

    def ring_index(self, ring_rank: int) -> torch.Tensor:
        """Original token index ([T_R], -1 = padding) of each token of a ring rank."""
        doc, pos = self.doc_pos(ring_rank)
        return torch.where(pos < self.real_len[doc], self.doc_start[doc] + pos, -1)

    def local_index(self, ring_rank: int, ulysses_rank: int) -> torch.Tensor:
        """Original token index ([T_local], -1 = padding) held by SP rank (ring, ulysses)."""
        if not 0 <= ulysses_rank < self.ulysses:
            raise ValueError(f"ulysses rank {ulysses_rank} is outside 0..{self.ulysses - 1}")
        n = self.local_tokens
        return self.ring_index(ring_rank)[ulysses_rank * n : (ulysses_rank + 1) * n]

    def position_ids(self, ring_rank: int, ulysses_rank: int) -> torch.Tensor:
        """Position within its document ([T_local]) of each token; 0 for padding."""
        doc, pos = self.doc_pos(ring_rank)
        n = self.local_tokens
        pos = torch.where(pos < self.real_len[doc], pos, 0)
        return pos[ulysses_rank * n : (ulysses_rank + 1) * n]

    def real_counts(self, ring_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(front_n, back_n): real (non-padding) tokens of each document in the ring rank's
        front and back chunks. Real tokens come first in each chunk, and the back chunk has
        some only if the front chunk is all real: real tokens are a prefix of each slab."""
        self._check_ring_rank(ring_rank)
        if self.ring == 1:
            return self.real_len.clone(), torch.zeros_like(self.real_len)
        c, L = self.chunk, self.real_len
        back = 2 * self.ring - 1 - ring_rank
        return (L - ring_rank * c).clamp(0).minimum(c), (L - back * c).clamp(0).minimum(c)

    def ring_cu_seqlens(self, ring_rank: int) -> torch.Tensor:
        """Attention documents of a ring rank's T_R tokens (cu_seqlens, int64, at most 2 N' + 1
        entries): per document its real tokens, then its padding as a document of its own;
        empty ones dropped."""
        front, back = self.real_counts(ring_rank)
        real = front + back
        seg = torch.stack([real, self.slab - real], 1).flatten()
        seg = seg[seg > 0]
        return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(seg, 0)])

    # ------------------------------------------------------------- whole batch
    @property
    def num_padding(self) -> int:
        """Padding tokens added over the whole SP group."""
        return self.ring * self.ring_tokens - self.num_tokens

    def padded_to_ring(self) -> torch.Tensor:
        """For each position of the padded sequence (documents in order, each followed by its
        padding; [R T_R]): the (ring rank) * T_R + local position that holds it."""
        n = len(self.padded_len)
        doc = torch.repeat_interleave(torch.arange(n), self.padded_len)
        p = torch.arange(int(self.padded_len.sum())) - self.padded_start[doc]
        if self.ring == 1:
            return self.local_start[doc] + p
        c = self.chunk[doc]
        k = p // c  # chunk index 0..2R-1
        owner = torch.where(k < self.ring, k, 2 * self.ring - 1 - k)
        local = self.local_start[doc] + p % c + torch.where(k < self.ring, 0, c)
        return owner * self.ring_tokens + local


__all__ = ["SPLayout", "doc_lengths", "ranges"]
