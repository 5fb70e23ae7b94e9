"""Test-session set-up shared by every test file.

Without a GPU the Triton kernels can only run through the Triton interpreter, which must be chosen before triton is
first imported anywhere; setting it here makes the order of test files irrelevant.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
