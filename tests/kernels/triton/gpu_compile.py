"""Compile the Triton kernels for NVIDIA GPUs on a machine without one (Triton's ahead-of-time
path: Python -> TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas).

The interpreter runs kernels through numpy and forgives what the GPU compiler does not
(loop-carried values changing type, unsupported ops, shared memory beyond the chip); this
catches those on CPU. Run in a process without TRITON_INTERPRET (which would turn the kernels
into interpreted functions):

    python -m tests.kernels.triton.gpu_compile [--all-configs]

Prints one JSON object per compiled (kernel, arch, config): shared memory bytes, registers
when reported, or the error. The default compiles each kernel once for sm_90 in bfloat16;
`--all-configs` compiles every autotune config of the attention kernels (causal) for head
dims 128 and 256 on sm_90.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Shared memory per block (bytes) that a kernel may use on each architecture.
SMEM_LIMIT = {80: 166912, 90: 232448}


def _signature(fn, ptrs: dict[str, str], floats: tuple[str, ...], constexprs: dict):
    """Triton signature of `fn`: pointers `*bf16` unless named in `ptrs`, scalars i32 unless
    in `floats` (fp32), constexprs from `constexprs`."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptrs.get(name, "*bf16")
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def _specs(all_configs: bool):
    """(label, jit function, signature, constexprs, num_warps, num_stages) to compile."""
    import triton.language as tl
    from triton.runtime.autotuner import Autotuner

    from kernels.attention import triton_attn_bwd_kernels as B
    from kernels.attention import triton_attn_fwd_kernels as A
    from kernels.attention import triton_merge as M
    from kernels.loss import triton_ce as C
    from kernels.norm import triton_norm as N
    from kernels.rope import triton_rope as R

    f32 = "*fp32"
    stats = {"lse_ptr": f32, "delta_ptr": f32, "dlse_ptr": f32}
    cu = {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32"}
    attn = [
        (A.attn_fwd_kernel, {"lse_ptr": f32, **cu}),
        (B.attn_bwd_dq_kernel, {**stats, **cu}),
        (B.attn_bwd_dkdv_kernel, {**stats, **cu}),
    ]
    for kernel, ptrs in attn:
        tuned = isinstance(kernel, Autotuner)
        fn = kernel.fn if tuned else kernel
        configs = kernel.configs if tuned and all_configs else None
        head_dims = (128, 256) if all_configs else (128,)
        for D in head_dims:
            for causal in (True, False) if not all_configs else (True,):
                if configs is None:
                    blocks = [({"BLOCK_M": 64, "BLOCK_N": 64}, 4, 2)]
                else:
                    blocks = [(c.kwargs, c.num_warps, c.num_stages) for c in configs]
                for kw, warps, stages in blocks:
                    const = {"CAUSAL": causal, "BLOCK_D": D, "PRECISION": "tf32", **kw}
                    sig = _signature(fn, ptrs, ("softmax_scale",), const)
                    label = f"{fn.__name__}-D{D}-{'causal' if causal else 'full'}-" + "-".join(
                        f"{k}{v}" for k, v in kw.items()
                    )
                    yield label, fn, sig, const, warps, stages
    if all_configs:
        return
    const = {"HAS_DLSE": True, "BLOCK_M": 64, "BLOCK_D": 128}
    fn = B.attn_bwd_preprocess_kernel
    yield fn.__name__, fn, _signature(fn, stats, (), const), const, 4, 1
    lse = {"lse_a_ptr": f32, "lse_b_ptr": f32, "lse_ptr": f32, "dlse_ptr": f32}
    lse.update({"dlse_a_ptr": f32, "dlse_b_ptr": f32})
    for fn in (M.merge_fwd_kernel, M.merge_bwd_kernel):
        const = {"COMPUTE": tl.float32, "BLOCK_T": 16, "BLOCK_D": 128}
        yield fn.__name__, fn, _signature(fn, lse, (), const), const, 4, 1
    fn = R.rope_kernel
    const = {"INVERSE": False, "BLOCK_T": 4, "BLOCK_H": 16, "BLOCK_D2": 64}
    ptrs = {"pos_ptr": "*i64", "inv_freq_ptr": f32}
    yield fn.__name__, fn, _signature(fn, ptrs, (), const), const, 4, 1
    const = {"BLOCK_T": 1, "BLOCK_E": 4096}
    fn = N.rms_norm_fwd_kernel
    yield fn.__name__, fn, _signature(fn, {"rstd_ptr": f32}, ("eps",), const), const, 8, 1
    fn = N.rms_norm_bwd_kernel
    ptrs = {"rstd_ptr": f32, "dw_partial_ptr": f32}
    yield fn.__name__, fn, _signature(fn, ptrs, (), const), const, 8, 1
    fn = C.ce_tile_kernel
    const = {"HAS_WEIGHTS": True, "WRITE_GRAD": True, "COMPUTE": tl.float32, "BLOCK_V": 1024}
    ptrs = {"logits_ptr": f32, "labels_ptr": "*i64", "weights_ptr": f32, "ce_ptr": f32}
    yield fn.__name__, fn, _signature(fn, ptrs, (), const), const, 4, 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all-configs", action="store_true")
    ap.add_argument("--only", nargs="*", default=None, help="kernel name prefixes to compile")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("gpu_compile: unset TRITON_INTERPRET first", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    archs = (90,)
    failed = 0
    for label, fn, sig, const, warps, stages in _specs(args.all_configs):
        if args.only and not any(label.startswith(name) for name in args.only):
            continue
        constexprs = {(fn.arg_names.index(k),): v for k, v in const.items()}
        for arch in archs:
            row = {"kernel": label, "arch": f"sm_{arch}", "num_warps": warps}
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": warps, "num_stages": stages},
                )
                row["shared"] = compiled.metadata.shared
                row["fits"] = compiled.metadata.shared <= SMEM_LIMIT[arch]
            except Exception as e:  # report every kernel, then fail at the end
                row["error"] = f"{type(e).__name__}: {e}"[:2000]
                failed += 1
            row["seconds"] = round(time.perf_counter() - t0, 2)
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
