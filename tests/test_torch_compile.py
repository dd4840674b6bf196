"""torch_compile must time compiled code in every cell of a sweep, or fail: never a silent eager fallback.

Dynamo gives up compiling a function after `recompile_limit` (8) shapes and runs it eagerly, still
called torch_compile. A worker serves a whole suite, so a 12-vocabulary sweep would have been timing
F.cross_entropy from its 9th cell on.
"""

import pytest
import torch
from torch._dynamo.utils import counters

from cebench.cases import Case, make_inputs
from cebench.registry import load_all
from cebench.runner import call, fresh_inputs

IMPLS = load_all()
SHAPES = [(4, 16 + 3 * i) for i in range(10)]  # ten shapes: more than Dynamo's default limit of 8


def _compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_every_shape_of_a_long_sweep_runs_compiled():
    impl = IMPLS["torch_compile"]
    for n, v in SHAPES:
        case = Case("logits", N=n, V=v)
        before = _compiled_graphs()
        inputs = fresh_inputs(make_inputs(case, "cpu"), case)
        call(impl, case, inputs).backward()
        assert _compiled_graphs() > before, f"shape {n}x{v} ran without compiling a graph (eager fallback)"


def test_hitting_the_limit_is_an_error_not_an_eager_run(monkeypatch):
    """Planted: a limit of 1. The next new shape must raise (the runner makes that a failed cell)."""
    torch._dynamo.reset()
    call(IMPLS["torch_compile"], Case("logits", N=3, V=11), make_inputs(Case("logits", N=3, V=11), "cpu"))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    case = Case("logits", N=3, V=13)
    with pytest.raises(Exception, match="(?i)recompile|limit"):
        call(IMPLS["torch_compile"], case, make_inputs(case, "cpu"))
    torch._dynamo.reset()
