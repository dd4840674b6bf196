"""The plugin registry: how an implementation declares itself and how cebench finds it.

An implementation is a plain function decorated with `@cebench.register(...)`. The
decorator stores a small frozen `Impl` record next to the function and returns the
function unchanged, so a plugin file stays importable and testable on its own.

Implementations are found in three places, in this order:
  1. the files in the repository's `impls/` folder, loaded by path (they are not an
     installed package: a file there is a plugin like any other);
  2. the `cebench.impls` entry-point group of installed distributions;
  3. `--plugin` arguments: a path to a .py file or an importable module name.
A plugin that fails to import is recorded with the reason and the rest still load.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

FAMILIES = ("logits", "linear", "vocab_parallel", "vocab_parallel_linear")
REDUCTIONS = ("mean", "sum", "none")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16", "autocast-bfloat16", "autocast-float16")
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "impls"


class RegistryError(Exception):
    """A declaration or a plugin that cebench cannot accept."""


@dataclass(frozen=True)
class Impl:
    """What an implementation is and what it supports. Built by `register`."""

    name: str
    family: str
    fn: Callable = field(repr=False, compare=False)
    source: str = ""
    description: str = ""
    reductions: tuple[str, ...] = ("mean",)
    ignore_index: bool = True
    label_smoothing: bool = False
    z_loss: bool = False
    softcap: bool = False
    devices: tuple[str, ...] = DEVICES
    dtypes: tuple[str, ...] = DTYPES
    mutates_inputs: bool = False
    uses_triton: bool = False
    requires: tuple[str, ...] = ()
    available: Callable[[], str | None] | None = field(default=None, repr=False, compare=False)
    # the reductions under which a training-mode forward already computes the gradient (so its
    # "forward" time holds most of the work and its backward only scales): the report shows it
    # next to every forward time, since comparing such a forward with a loss-only one is unfair
    grad_in_forward: tuple[str, ...] = ()
    # a per-case rule beyond the declared options (size multiples, equal shards): case -> reason or None
    case_rule: Callable | None = field(default=None, repr=False, compare=False)

    def forward_computes_grad(self, reduction: str) -> bool:
        return reduction in self.grad_in_forward

    def unavailable_reason(self) -> str | None:
        """None when the implementation can run here, else what is missing."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return "missing package(s): " + ", ".join(missing)
        try:
            reason = self.available() if self.available is not None else None
        except Exception as exc:  # an availability check must never crash a listing
            return f"availability check raised {type(exc).__name__}: {exc}"
        if reason is None and self.uses_triton and os.environ.get("TRITON_INTERPRET") == "1":
            return interpreter_refusal()
        return reason

    def unsupported_reason(self, case, device: str) -> str | None:
        """None when this implementation supports the case on `device`, else why not."""
        if case.family != self.family:
            return f"family {case.family!r} is not {self.family!r}"
        if device not in self.devices:
            return f"device {device} not supported (supports {', '.join(self.devices)})"
        if case.dtype not in self.dtypes:
            return f"dtype {case.dtype} not supported"
        if case.reduction not in self.reductions:
            return f"reduction={case.reduction} not supported"
        if case.ignore_frac > 0 and not self.ignore_index:
            return "ignore_index not supported"
        for option in ("label_smoothing", "z_loss", "softcap"):
            if getattr(case, option) and not getattr(self, option):
                return f"{option} not supported"
        return self.case_rule(case) if self.case_rule else None

    def options_summary(self) -> str:
        flags = [o for o in ("ignore_index", "label_smoothing", "z_loss", "softcap") if getattr(self, o)]
        if self.grad_in_forward:
            flags.append("grad in forward" + ("" if self.grad_in_forward == self.reductions
                                               else f" ({'/'.join(self.grad_in_forward)})"))
        return "reduction=" + "/".join(self.reductions) + ("; " + ", ".join(flags) if flags else "")


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def interpreter_refusal_for(triton_version: str, numpy_version: str) -> str | None:
    """Triton's interpreter before 3.7 turns a one-element array into a Python int (a tensor used as a
    loop bound or an index), which numpy 2.4 made an error: every such kernel fails mid-run."""
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter cannot run with numpy {numpy_version} (it calls int() on "
                "one-element arrays, an error since numpy 2.4): install triton>=3.7 or numpy<2.4")
    return None


@functools.cache
def interpreter_refusal() -> str | None:
    """Why Triton kernels cannot run in this environment's interpreter, or None."""
    try:
        import numpy
        import triton
    except ImportError:  # the implementation's own check names what is missing
        return None
    return interpreter_refusal_for(triton.__version__, numpy.__version__)


_REGISTRY: dict[str, Impl] = {}
LOAD_ERRORS: dict[str, str] = {}  # plugin source -> why it failed to import


def register(
    name: str,
    family: str = "logits",
    *,
    reductions: tuple[str, ...] | list[str] = ("mean",),
    ignore_index: bool = True,
    label_smoothing: bool = False,
    z_loss: bool = False,
    softcap: bool = False,
    devices: tuple[str, ...] | list[str] = DEVICES,
    dtypes: tuple[str, ...] | list[str] = DTYPES,
    mutates_inputs: bool = False,
    uses_triton: bool = False,
    requires: tuple[str, ...] | list[str] = (),
    available: Callable[[], str | None] | None = None,
    description: str = "",
    grad_in_forward: bool | tuple[str, ...] | list[str] = False,
    case_rule: Callable | None = None,
):
    """Declare a cross-entropy implementation.

    family "logits": fn(logits, targets, *, reduction, ignore_index, **options)
    family "linear": fn(hidden, weight, targets, *, reduction, ignore_index, **options)
    family "vocab_parallel[_linear]": the same on this rank's vocab shard, + vocab_start, group (impls/vocab_parallel.py)
    Options beyond reduction/ignore_index (label_smoothing, z_loss, softcap) are passed
    only when a case sets them and the declaration says they are supported. The function
    returns a differentiable loss like `F.cross_entropy` (with z_loss included).
    grad_in_forward: True when the forward computes the whole gradient too (fused kernels that
    store it for the backward to scale), or the reductions for which it does.
    case_rule: a function of the case returning why it cannot be served (None: it can), for limits
    the options above cannot say, such as size multiples or equal vocabulary shards.
    """
    _check_declaration(name, family, reductions, devices, dtypes)
    if isinstance(grad_in_forward, bool):
        grad_in_forward = tuple(reductions) if grad_in_forward else ()
    elif any(r not in reductions for r in grad_in_forward):
        raise RegistryError(f"register({name!r}): grad_in_forward {list(grad_in_forward)} must be among the "
                            f"declared reductions {list(reductions)}")

    def decorator(fn: Callable) -> Callable:
        impl = Impl(
            name=name, family=family, fn=fn, source=_source_of(fn), description=description or _first_line(fn),
            reductions=tuple(reductions), ignore_index=ignore_index, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, devices=tuple(devices), dtypes=tuple(dtypes),
            mutates_inputs=mutates_inputs, uses_triton=uses_triton, requires=tuple(requires), available=available,
            grad_in_forward=tuple(grad_in_forward), case_rule=case_rule,
        )
        previous = _REGISTRY.get(name)
        if previous is not None and previous.source != impl.source:
            raise RegistryError(f"duplicate implementation name {name!r}: defined in {previous.source} and in {impl.source}")
        _REGISTRY[name] = impl
        fn.cebench_impl = impl
        return fn

    return decorator


def _check_declaration(name, family, reductions, devices, dtypes) -> None:
    if not isinstance(name, str) or not name:
        raise RegistryError(f"register(name=...) needs a non-empty string, got {name!r}")
    checks = [("family", [family], FAMILIES), ("reductions", reductions, REDUCTIONS),
              ("devices", devices, DEVICES), ("dtypes", dtypes, DTYPES)]
    for key, values, allowed in checks:
        bad = [v for v in values if v not in allowed]
        if bad:
            raise RegistryError(f"register({name!r}): {key} {bad} not in {list(allowed)}")


def _source_of(fn: Callable) -> str:
    try:
        return f"{inspect.getsourcefile(fn)}:{fn.__qualname__}"
    except TypeError:
        return f"{fn.__module__}:{getattr(fn, '__qualname__', fn)}"


def _first_line(fn: Callable) -> str:
    return (inspect.getdoc(fn) or "").split("\n")[0]


def load_file(path: str | Path) -> None:
    """Import a plugin file by path under a private module name (not `impls.*`)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise RegistryError(f"plugin file not found: {path}")
    module_name = "cebench_plugin_" + path.stem
    if module_name in sys.modules and getattr(sys.modules[module_name], "__file__", None) == str(path):
        return
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[module_name]
        raise


def load_plugin(spec: str) -> None:
    """A --plugin argument: a .py path or a module name. Errors propagate to the caller."""
    if spec.endswith(".py") or os.sep in spec or Path(spec).is_file():
        load_file(spec)
    else:
        importlib.import_module(spec)


def _load_recording_errors(source: str, loader: Callable[[], None]) -> None:
    try:
        loader()
    except RegistryError:
        raise
    except Exception as exc:
        LOAD_ERRORS[source] = f"{type(exc).__name__}: {exc}"


def load_all(plugins: list[str] | tuple[str, ...] = (), builtin_dir: Path = BUILTIN_DIR) -> dict[str, Impl]:
    """Load built-in files, entry points and explicit plugins; return the registry."""
    for path in sorted(builtin_dir.glob("*.py")) if builtin_dir.is_dir() else []:
        if not path.name.startswith("_"):
            _load_recording_errors(str(path), lambda p=path: load_file(p))
    for entry in importlib.metadata.entry_points(group="cebench.impls"):
        _load_recording_errors(f"entry point {entry.name}", entry.load)
    for spec in plugins:
        _load_recording_errors(spec, lambda s=spec: load_plugin(s))
    return dict(_REGISTRY)


def registry() -> dict[str, Impl]:
    return dict(_REGISTRY)


def select(names: list[str] | None) -> list[Impl]:
    """The implementations named (all when None); unknown names are an error listing the known ones."""
    if not names:
        return list(_REGISTRY.values())
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise RegistryError(f"unknown implementation(s) {unknown}; known: {', '.join(sorted(_REGISTRY))}")
    return [_REGISTRY[n] for n in names]
