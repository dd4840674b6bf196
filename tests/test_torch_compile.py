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


def test_hitting_the_limit_is_an_error_not_an_eager_run():
    """Planted: a limit of 1. The next new shape must raise (the runner makes that a failed cell). Dynamo's own
    config.patch, not monkeypatch: pytest 9.2's undo deletes the setting (the config module has no __dict__ entry)."""
    torch._dynamo.reset()
    call(IMPLS["torch_compile"], Case("logits", N=3, V=11), make_inputs(Case("logits", N=3, V=11), "cpu"))
    case = Case("logits", N=3, V=13)
    with torch._dynamo.config.patch(recompile_limit=1), pytest.raises(Exception, match="(?i)recompile|limit"):
        call(IMPLS["torch_compile"], case, make_inputs(case, "cpu"))
    torch._dynamo.reset()


def test_the_compile_caches_are_off_once_a_call_runs_under_autocast():
    """torch 2.11's Inductor caches hand a graph compiled under one autocast dtype to a call under another; a process
    that calls under autocast must not use them. Plain calls leave them as they are."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from cebench import runner

    runner.compile_without_caches_under_autocast.cache_clear()
    saved = inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache
    try:
        inductor_config.fx_graph_cache = functorch_config.enable_autograd_cache = True
        impl = IMPLS["linear_torch"]
        for dtype, expected in (("float32", True), ("autocast-bfloat16", False)):
            case = Case("linear", N=4, V=9, H=8, dtype=dtype)
            call(impl, case, fresh_inputs(make_inputs(case, "cpu"), case))
            assert (inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache) == (expected, expected), dtype
    finally:
        inductor_config.fx_graph_cache, functorch_config.enable_autograd_cache = saved
        runner.compile_without_caches_under_autocast.cache_clear()  # the next autocast call turns them off again


def test_a_compiled_linear_head_under_autocast_float16_computes_in_float16_after_bfloat16():
    """Seen on torch 2.11 (CPU): a compiled linear head called under autocast-bfloat16, then autocast-float16, returned
    the bf16 graph's gradient in the fp16 cell (CCE's compiled baseline: 9.3x fp16's error). Through cebench's call
    it must match eager PyTorch under the same policy. (On torch 2.13 Dynamo recompiles by itself.)"""
    import torch.nn.functional as F

    from cebench import registry, runner

    @torch.compile(fullgraph=True, dynamic=True)
    def head(hidden, weight, targets, reduction="mean", ignore_index=-100):
        return F.cross_entropy((hidden @ weight.T).float(), targets, reduction=reduction, ignore_index=ignore_index)

    runner.compile_without_caches_under_autocast.cache_clear()
    compiled = registry.Impl("compiled_head", "linear", head)
    torch._dynamo.reset()
    grads = {}
    for name, impl, dtype in (("bf16", compiled, "autocast-bfloat16"), ("compiled", compiled, "autocast-float16"),
                              ("eager", IMPLS["linear_torch"], "autocast-float16")):
        case = Case("linear", N=48, V=1031, H=64, dtype=dtype)
        inputs = fresh_inputs(make_inputs(case, "cpu"), case)
        call(impl, case, inputs).backward()
        grads[name] = inputs["hidden"].grad
    diff = (grads["compiled"] - grads["eager"]).norm() / grads["eager"].norm()
    assert diff < 1e-3, f"the float16 cell's gradient is {diff:.1e} off eager float16 (a bf16 graph gives ~9e-3)"
