"""Attention backends (flash-attn, Triton, torch) and fused ops (cross-entropy, RoPE, RMSNorm).

Shape legend, one for the whole project (DESIGN.md, "Conventions"). A name carries the shape
of its tensor as a suffix of these letters: `q_THD`, `lse_HT`, `x_TE`, `cu_seqlens_N1`.

    T   tokens (on this rank unless said). In attention, q and k/v may hold different
        counts (a rank's queries against a gathered key prefix): Tq / Tk where they differ;
        names say T for both (`q_THD`, `k_TKD`).
    S   sequences
    N   documents; document boundaries are cu_seqlens [N + 1]
    Hq  query heads; K key/value heads; H when either (`q_THD`: H = Hq). G = Hq / K.
    D   head dim
    E   model width
    F   MLP width
    V   vocabulary
    P   SP size
    R   ring size

A file that needs more letters (a block of a kernel, a tile, one document's length L) adds
them to this legend in its own docstring, never giving a letter above a second meaning.

Every backend and fused op follows one chain (FLA style): kernel -> fwd / bwd -> autograd
Function -> public function with a shape docstring, with a readable `naive.py` reference
beside the kernel. `kernels` imports no other package of ours.
"""
