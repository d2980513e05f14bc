"""The precision rules of our kernels: which float dtypes they take, what they accumulate in.

16-bit and float32 inputs accumulate (and return lse, softmax statistics, losses) in float32;
float64 inputs stay in float64 throughout, which is what makes float64 the exact reference
path. The `naive.py` references spell the rule out themselves, so that they share no code
with the kernels they check.
"""

import torch

__all__ = ["FLOAT_DTYPES", "acc_dtype"]

# Every float dtype the torch paths take; the Triton kernels take fewer (`TRITON_DTYPES`).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any of `dtypes` is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
