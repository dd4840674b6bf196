"""pytest-benchmark of the implementations on a small CPU shape (forward+backward).

These record numbers for people to read (JSON under results/pytest-benchmark/); they
assert nothing about speed. Triton-interpreter implementations are left out: their
timings mean nothing.
"""

import pytest

from cebench.cases import Case, make_grad_output, make_inputs
from cebench.registry import load_all
from cebench.runner import call, fresh_inputs

IMPLS = load_all()
CASES = {"logits": Case("logits", N=256, V=4099, ignore_frac=0.1),
         "linear": Case("linear", N=256, V=4099, H=128, ignore_frac=0.1)}
BENCHED = sorted(n for n, i in IMPLS.items() if i.family in CASES and not i.uses_triton and "cpu" in i.devices)


@pytest.mark.parametrize("name", BENCHED)
def test_forward_backward(benchmark, name, runnable):
    impl = IMPLS[name]
    runnable(impl)
    case = CASES[impl.family]
    pristine = make_inputs(case, "cpu")
    grad_out = make_grad_output(case, "cpu")

    def setup():
        return (fresh_inputs(pristine, case),), {}

    def step(inputs):
        call(impl, case, inputs).backward(grad_out)
        return inputs

    inputs = benchmark.pedantic(step, setup=setup, rounds=10, warmup_rounds=1)
    grads = [t.grad for k, t in inputs.items() if k != "targets"]
    assert all(g is not None and g.isfinite().all() for g in grads)
