"""Our linear kernels with column-major inputs and an upstream gradient other than 1.

Found by the conformance matrix: triton_fused_linear allocated grad_hidden with empty_like(hidden), which
keeps a column-major hidden's strides, and its backward then scaled that buffer with a row kernel that
assumes unit column stride: the hidden gradient came out wrong (rel 0.89) whenever the upstream gradient
was not exactly 1 (at 1 the kernel skips every row, which hid it from the timed runs).
"""

import pytest
import torch

from cebench.agreement import compare
from cebench.cases import Case, make_inputs
from cebench.reference import reference
from cebench.registry import load_all

IMPLS = load_all()


@pytest.mark.parametrize("name", ["triton_fused_linear", "linear_chunked"])
@pytest.mark.parametrize("layout", ["hidden", "weight", "both"])
@pytest.mark.parametrize("upstream", [0.7, 1.0])
def test_column_major_inputs(name, layout, upstream):
    case = Case("linear", N=64, V=512, H=64)
    pristine = make_inputs(case, "cpu")

    def leaf(key):
        x = pristine[key]
        return (x.t().contiguous().t() if layout in (key, "both") else x.clone()).requires_grad_()

    hidden, weight = leaf("hidden"), leaf("weight")
    loss = IMPLS[name].fn(hidden, weight, pristine["targets"])
    loss.backward(torch.tensor(upstream))
    ref = reference(case, pristine, torch.tensor(upstream))
    bad = [a.describe() for a in compare({"loss": loss.detach(), "hidden": hidden.grad, "weight": weight.grad}, ref,
                                         "float32") if not a.ok]
    assert not bad, bad
