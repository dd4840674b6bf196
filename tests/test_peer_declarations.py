"""What each peer declares against what its library does (QuACK, Megatron-Core, Liger, CCE, torch's chunked CE).

A ranking compares like with like only if each implementation says what its timed forward
does: computes the gradient too or not (grad_in_forward), overwrites its inputs or not
(mutates_inputs), in which dtypes and with which reductions. These tests hold the declarations
to the libraries wherever a library can be imported here (otherwise they skip, naming the
package): the signatures the adapters rely on, an undeclared option really refused by the
library, and a declared gradient-in-forward really present after the forward alone. Every peer
file's docstring must carry its fairness notes.
"""

import importlib.util
import inspect
import sys
import typing

import pytest
import torch

from cebench import registry
from cebench.cases import Case, make_inputs

IMPLS = registry.load_all()
PEER_FILES = {"quack": ("quack", "quack_linear"), "megatron": ("megatron_vp", "megatron_vp_fused"),
              "liger": ("liger", "liger_linear"), "cce": ("cce", "cce_torch_compile"), "torch_linear": ("torch_linear",)}


def _module(impl_name: str):
    return sys.modules[IMPLS[impl_name].fn.__module__]


GPU_ONLY = {"quack-kernels", "nvidia-cutlass-dsl"}  # CUDA-only peers: not test dependencies, installed on GPU machines


def _needs(package: str, distribution: str):
    """A test dependency must be importable (a missing one fails); a CUDA-only peer is checked where installed."""
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found and distribution in GPU_ONLY:
        pytest.skip(f"{distribution} not installed: a CUDA-only peer (pip install -e '.[quack]' on a GPU machine)")
    assert found, f"{distribution} is a test dependency: pip install -e '.[test]'"


def _literal_values(annotation) -> set[str]:
    return set(typing.get_args(annotation))


@pytest.mark.parametrize("stem,names", PEER_FILES.items())
def test_every_peer_file_loads_and_writes_its_fairness_notes(stem, names):
    assert not [s for s in registry.LOAD_ERRORS if s.endswith(f"/{stem}.py")], registry.LOAD_ERRORS
    assert set(names) <= set(IMPLS)
    doc = (_module(names[0]).__doc__ or "").lower()
    assert "fairness notes" in doc, f"impls/{stem}.py: no 'Fairness notes' section in its docstring"
    notes = doc[doc.index("fairness notes"):]
    for key in ("forward computes", "mutates", "accumulates in"):
        assert key in notes, f"impls/{stem}.py fairness notes do not say what it {key}"


def test_quack_declarations_without_the_library():
    quack, linear = IMPLS["quack"], IMPLS["quack_linear"]
    assert quack.reductions == ("mean", "sum", "none") and linear.reductions == ("mean", "sum")
    assert quack.devices == linear.devices == ("cuda",)
    assert linear.dtypes == ("bfloat16", "float16") and "float32" in quack.dtypes
    assert not quack.grad_in_forward and linear.grad_in_forward == ("mean", "sum")
    assert not (quack.mutates_inputs or linear.mutates_inputs)
    for impl in (quack, linear):
        assert not (impl.label_smoothing or impl.z_loss or impl.softcap) and impl.ignore_index
    gpt2_head = Case("linear", N=64, V=50257, H=768, dtype="bfloat16")
    assert "multiples of 8" in linear.unsupported_reason(gpt2_head, "cuda")
    assert "N=60" in linear.unsupported_reason(Case("linear", N=60, V=50304, H=768, dtype="bfloat16"), "cuda")
    assert linear.unsupported_reason(Case("linear", N=64, V=50304, H=768, dtype="bfloat16"), "cuda") is None
    reason = quack.unavailable_reason()
    if not torch.cuda.is_available():
        assert reason is not None and ("CUDA" in reason or "quack" in reason)


def test_quack_signatures_match_the_declarations():
    _needs("quack", "quack-kernels")
    _needs("cutlass", "nvidia-cutlass-dsl")
    from quack.cross_entropy import cross_entropy
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    ce = inspect.signature(cross_entropy).parameters
    assert _literal_values(ce["reduction"].annotation) == {"mean", "sum", "none"}
    assert ce["ignore_index"].default == -100 and ce["inplace_backward"].default is False  # the adapter's default
    assert not set(ce) & {"label_smoothing", "z_loss", "lse_square_scale", "softcap"}
    lin = inspect.signature(chunked_linear_cross_entropy).parameters
    assert _literal_values(lin["reduction"].annotation) == {"mean", "sum"}
    assert lin["chunk_size"].default == 4096 and not set(lin) & {"label_smoothing", "softcap", "z_loss"}


def test_quack_linear_really_refuses_reduction_none():
    _needs("quack", "quack-kernels")
    _needs("cutlass", "nvidia-cutlass-dsl")
    from quack.linear_cross_entropy import chunked_linear_cross_entropy

    x, w, t = torch.zeros(8, 8, dtype=torch.bfloat16), torch.zeros(16, 8, dtype=torch.bfloat16), torch.zeros(8).long()
    with pytest.raises(ValueError, match="reduction"):
        chunked_linear_cross_entropy(x, w, t, reduction="none")


def test_megatron_signatures_match_the_adapter():
    _needs("megatron.core", "megatron-core")
    _, per_token, fused = _module("megatron_vp")._megatron()
    params = inspect.signature(per_token).parameters
    # no ignore_index and no reduction: the adapter masks and reduces; label_smoothing exists but is declined
    assert list(params)[:2] == ["vocab_parallel_logits", "target"] and "label_smoothing" in params
    assert not set(params) & {"ignore_index", "reduction"}
    assert "tp_group" in inspect.signature(fused).parameters
    assert not IMPLS["megatron_vp"].label_smoothing and not IMPLS["megatron_vp_fused"].label_smoothing


@pytest.mark.skipif(torch.cuda.is_available(), reason="checked on the CPU through the Triton interpreter")
def test_liger_forward_alone_leaves_the_gradient_in_the_logits():
    """grad_in_forward=True and mutates_inputs=True, observed: after the forward, before any backward,
    the logits hold softmax - onehot, divided by the number of non-ignored rows (reduction mean)."""
    impl = IMPLS["liger"]
    case = Case("logits", N=6, V=37, ignore_frac=0.3)
    assert impl.unavailable_reason() is None  # a test dependency
    assert impl.grad_in_forward == impl.reductions and impl.mutates_inputs
    inputs = make_inputs(case, "cpu")
    logits, targets = inputs["logits"].clone().requires_grad_(), inputs["targets"]
    impl.fn(logits, targets, reduction="mean")
    valid = targets != -100
    expected = torch.softmax(inputs["logits"].double(), dim=1)
    expected[valid, targets[valid]] -= 1
    expected = torch.where(valid[:, None], expected / valid.sum(), 0.0)
    torch.testing.assert_close(logits.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_declared_options_summary_is_what_list_prints():
    for names in PEER_FILES.values():
        for name in names:
            summary = IMPLS[name].options_summary()
            assert summary.startswith("reduction=" + "/".join(IMPLS[name].reductions))
            assert ("grad in forward" in summary) == bool(IMPLS[name].grad_in_forward)
