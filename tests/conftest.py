"""Test-session set-up shared by every test file.

Without a GPU the Triton kernels can only run through the Triton interpreter, which must be chosen before triton is
first imported anywhere; setting it here makes the order of test files irrelevant.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Global blocks run the published method's patched attention unless a test asks for another strategy: with "auto"
# the cost model would pick dense attention for the tiny test models, and the eventful attention path would go
# untested. tests/test_strategy.py covers "dense" and "auto" explicitly.
os.environ.setdefault("EVENTFUL_ATTENTION", "eventful")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and on a busy 2-core machine OpenMP spin-waits of a second
    thread can slow such tests by 100x. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
