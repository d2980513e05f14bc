"""Run the Triton kernels of these tests through Triton's CPU interpreter when there is no GPU.

`triton.jit` reads TRITON_INTERPRET when a kernel is defined, i.e. when a kernel module is
first imported; pytest loads this file while collecting the directory, before the test
modules import any kernel module, so setting it here is early enough. On a machine with a
GPU nothing is set and the same tests run the compiled kernels on CUDA tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
