"""Shared test set-up: the Triton interpreter on CPU, and the registry loaded once."""

import os

import torch

# Triton kernels run on the CPU through the interpreter; the variable must be set before
# any @triton.jit function is defined, i.e. before the implementation files are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cebench import registry  # noqa: E402


@pytest.fixture(scope="session")
def impls():
    return registry.load_all()
