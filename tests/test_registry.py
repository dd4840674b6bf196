"""The plugin contract: registration, declarations, discovery, availability and support checks."""

import dataclasses
import sys
import textwrap

import pytest

import cebench
from cebench import registry
from cebench.cases import Case

DATA = __import__("pathlib").Path(__file__).parent / "data"


def test_builtins_are_discovered_from_impls_dir(impls):
    expected = {"naive_softmax", "manual_logsoftmax", "torch", "torch_compile", "chunked",
                "linear_torch", "linear_chunked"}
    assert expected <= set(impls)
    assert "impls" not in sys.modules  # loaded by path, not as an installed package


def test_plugin_file_registers_through_public_contract(impls):
    registry.load_plugin(str(DATA / "my_ce_plugin.py"))
    impl = registry.registry()["my_ce"]
    assert impl.family == "logits" and impl.reductions == ("mean",) and impl.ignore_index
    assert impl.unavailable_reason() is None


def test_duplicate_name_names_both_sources(tmp_path):
    for stem in ("first", "second"):
        (tmp_path / f"{stem}.py").write_text(textwrap.dedent("""
            import cebench
            @cebench.register(name="dup_ce")
            def f(logits, targets, *, reduction="mean", ignore_index=-100):
                return logits.sum()
        """))
    registry.load_file(tmp_path / "first.py")
    with pytest.raises(cebench.RegistryError) as err:
        registry.load_file(tmp_path / "second.py")
    assert "first.py" in str(err.value) and "second.py" in str(err.value)


def test_bad_declaration_is_rejected():
    with pytest.raises(cebench.RegistryError, match="reductions"):
        cebench.register(name="bad_red", reductions=("avg",))
    with pytest.raises(cebench.RegistryError, match="family"):
        cebench.register(name="bad_fam", family="conv")


def test_unavailable_reason_names_what_is_missing():
    @cebench.register(name="needs_pkg", requires=("a_package_that_does_not_exist",))
    def needs_pkg(logits, targets, *, reduction="mean", ignore_index=-100):
        raise AssertionError("never called")

    reason = registry.registry()["needs_pkg"].unavailable_reason()
    assert "a_package_that_does_not_exist" in reason


@pytest.mark.parametrize("triton_version,numpy_version,refused", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.5.5", True), ("3.4.0", "2.4.6", True),
    ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.0", False), ("3.9.0", "2.5.5", False), ("3.6.0+git1a2b", "1.26.4", False)])
def test_interpreter_refusal_names_the_pair_that_cannot_work(triton_version, numpy_version, refused):
    # Triton's interpreter before 3.7 calls int() on one-element arrays, an error from numpy 2.4 on (seen with
    # triton 3.6.0 and numpy 2.4.6 and 2.5.5: every kernel looping to a tensor bound failed mid-run)
    reason = registry.interpreter_refusal_for(triton_version, numpy_version)
    assert bool(reason) == refused
    if refused:
        assert triton_version in reason and numpy_version in reason and "triton>=3.7" in reason


def test_interpreted_triton_implementation_is_unavailable_with_an_incompatible_numpy(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the plant leaves with the test

    @cebench.register(name="interpreted_kernel", uses_triton=True)
    def interpreted_kernel(logits, targets, *, reduction="mean", ignore_index=-100):
        raise AssertionError("never called")

    impl = registry.registry()["interpreted_kernel"]
    monkeypatch.setattr(registry, "interpreter_refusal", lambda: "refused for this pair")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert impl.unavailable_reason() == "refused for this pair"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled for a GPU: numpy is not in the way
    assert impl.unavailable_reason() is None


def test_unsupported_options_are_explained(impls):
    torch_impl = impls["torch"]
    assert torch_impl.unsupported_reason(Case("logits", N=2, V=3, z_loss=0.1), "cpu") == "z_loss not supported"
    assert "family" in torch_impl.unsupported_reason(Case("linear", N=2, V=3, H=4), "cpu")
    mean_only = dataclasses.replace(impls["linear_chunked"], reductions=("mean",))  # every built-in linear has none now
    assert "reduction=none" in mean_only.unsupported_reason(Case("linear", N=2, V=3, H=4, reduction="none"), "cpu")


def test_select_unknown_lists_known(impls):
    with pytest.raises(cebench.RegistryError) as err:
        registry.select(["torch", "nope"])
    assert "nope" in str(err.value) and "naive_softmax" in str(err.value)


def test_broken_plugin_is_recorded_not_fatal(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("raise ImportError('needs a library we do not have')\n")
    registry.load_all([str(bad)])
    assert "needs a library" in registry.LOAD_ERRORS[str(bad)]
    assert "torch" in registry.registry()
