"""Suites: TOML files that describe a sweep, read with tomllib and checked strictly.

    name = "gpt2"
    description = "..."
    device = "cuda"            # "cpu", "cuda" or "any": where the suite is meant to run
    [timing]                   # optional, overrides cebench.measure.TimingPlan
    min_time_s = 0.1
    upstream_grad = "ones"     # the timed backward's upstream gradient: "ones" (training) or "random"
    [[sweep]]                  # one or more grids; each is a cartesian product
    family = "linear"          # logits | linear | vocab_parallel | vocab_parallel_linear
    batch = [1, 4]             # with seq: N = batch × seq (or give N = [...])
    seq = [1024]
    V = [50257]
    H = [768]                  # linear family only
    dtype = ["bfloat16"]       # "autocast-bfloat16": float32 inputs, the call under torch.autocast
    reduction = ["mean"]       # also ignore_frac, label_smoothing, z_loss, softcap lists
    modes = ["forward", "backward", "forward+backward", "eval"]   # eval: loss only, under no_grad
    impls = ["torch", ...]     # optional: restrict this grid to these implementations
    world_size = [1, 2]        # vocab_parallel families: ranks to shard V over (default: --nproc)
    distribution = ["gaussian", "lm"]   # the inputs (cebench.cases, cebench.distributions): "gaussian"
                               # (default), "lm" (peaked, 2.5 nats), "confident" (target p ~ 1), "unlikely" (p ~ 0)
    take = [2]                 # measure these cells again (same inputs), for the report's stability table

Every error names the file, the key and the form expected.
"""

from __future__ import annotations

import hashlib
import itertools
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from cebench.cases import DISTRIBUTIONS, MODES, Case, CaseError
from cebench.measure import TimingPlan

UPSTREAM_GRADS = ("ones", "random")
SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"
DEFAULT_SUITE = {"cpu": "smoke", "cuda": "gpt2"}

_TOP_KEYS = {"name": str, "description": str, "device": str, "timing": dict, "sweep": list}
# grid key -> (element type, expected form for messages)
_GRID_KEYS = {
    "N": (int, "a list of positive integers"),
    "batch": (int, "a list of positive integers"),
    "seq": (int, "a list of positive integers"),
    "V": (int, "a list of positive integers"),
    "H": (int, "a list of positive integers"),
    "dtype": (str, 'a list of "float32", "bfloat16", "float16", "autocast-bfloat16", "autocast-float16"'),
    "reduction": (str, 'a list of "mean", "sum", "none"'),
    "ignore_frac": (float, "a list of numbers in [0, 1]"),
    "label_smoothing": (float, "a list of numbers in [0, 1]"),
    "z_loss": (float, "a list of non-negative numbers"),
    "softcap": (float, "a list of positive numbers"),
    "modes": (str, f"a list of {', '.join(repr(m) for m in MODES)}"),
    "impls": (str, "a list of implementation names"),
    "seed": (int, "a list of integers"),
    "world_size": (int, "a list of positive integers (vocab_parallel families only; default: --nproc)"),
    "distribution": (str, f"a list of {', '.join(repr(d) for d in DISTRIBUTIONS)}"),
    "take": (int, "a list of positive integers (2: the same cell measured again, for its stability)"),
}
_FAMILIES = ("logits", "linear", "vocab_parallel", "vocab_parallel_linear")
_SCALAR_KEYS = {"family": (str, " or ".join(f'"{f}"' for f in _FAMILIES))}


class SuiteError(ValueError):
    """A suite file that cannot be used; the message names file, key and expected form."""


@dataclass(frozen=True)
class Grid:
    cases: tuple[Case, ...]
    modes: tuple[str, ...]
    impls: tuple[str, ...] | None


@dataclass(frozen=True)
class Suite:
    name: str
    path: Path
    description: str
    device: str
    timing: TimingPlan
    grids: tuple[Grid, ...]
    sha256: str

    def cells(self):
        """(case, modes, impl-restriction) for every case of every grid, in file order."""
        for grid in self.grids:
            for case in grid.cases:
                yield case, grid.modes, grid.impls


def resolve(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise SuiteError(f"{path}: suite file not found")
        return path
    candidate = SUITES_DIR / f"{name_or_path}.toml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in SUITES_DIR.glob("*.toml")))
        raise SuiteError(f"unknown suite {name_or_path!r}; known suites: {known} (or give a path to a .toml file)")
    return candidate


def load(name_or_path: str) -> Suite:
    path = resolve(name_or_path)
    raw_bytes = path.read_bytes()
    try:
        data = tomllib.loads(raw_bytes.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: not valid TOML: {exc}") from exc
    _check_top(path, data)
    grids = tuple(_grid(path, i, g) for i, g in enumerate(data["sweep"]))
    return Suite(
        name=data.get("name", path.stem), path=path, description=data.get("description", ""),
        device=data.get("device", "any"), timing=_timing(path, data.get("timing", {})), grids=grids,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
    )


def _check_top(path: Path, data: dict) -> None:
    for key, value in data.items():
        if key not in _TOP_KEYS:
            raise SuiteError(f"{path}: unknown key {key!r}; expected one of {sorted(_TOP_KEYS)}")
        if not isinstance(value, _TOP_KEYS[key]):
            raise SuiteError(f"{path}: key {key!r} must be a {_TOP_KEYS[key].__name__}, got {type(value).__name__}")
    if not data.get("sweep"):
        raise SuiteError(f"{path}: key 'sweep' is missing or empty; expected one or more [[sweep]] tables")
    if data.get("device", "any") not in ("cpu", "cuda", "any"):
        raise SuiteError(f"{path}: key 'device' must be \"cpu\", \"cuda\" or \"any\", got {data['device']!r}")


def _timing(path: Path, table: dict) -> TimingPlan:
    allowed = {f.name: f.type for f in fields(TimingPlan)}
    for key, value in table.items():
        if key not in allowed:
            raise SuiteError(f"{path}: unknown key 'timing.{key}'; expected one of {sorted(allowed)}")
        if key == "upstream_grad":
            if value not in UPSTREAM_GRADS:
                raise SuiteError(f"{path}: key 'timing.upstream_grad' must be \"ones\" or \"random\", got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise SuiteError(f"{path}: key 'timing.{key}' must be a non-negative number, got {value!r}")
    counts = {"warmup", "min_repeats", "max_repeats"}
    return TimingPlan(**{k: v if k == "upstream_grad" else int(v) if k in counts else float(v) for k, v in table.items()})


def _grid_values(path: Path, where: str, key: str, value) -> list:
    elem_type, form = _GRID_KEYS[key]
    if not isinstance(value, list):
        value = [value]
    if not value:
        raise SuiteError(f"{path}: key '{where}.{key}' is an empty list; expected {form}")
    for item in value:
        ok = isinstance(item, (int, float)) and not isinstance(item, bool) if elem_type is float else (
            isinstance(item, elem_type) and not isinstance(item, bool))
        if not ok:
            raise SuiteError(f"{path}: key '{where}.{key}' has {item!r}; expected {form}")
    return value


def _grid(path: Path, index: int, table: dict) -> Grid:
    where = f"sweep[{index}]"
    if not isinstance(table, dict):
        raise SuiteError(f"{path}: '{where}' must be a table ([[sweep]]), got {type(table).__name__}")
    for key in table:
        if key not in _GRID_KEYS and key not in _SCALAR_KEYS:
            raise SuiteError(f"{path}: unknown key '{where}.{key}'; expected one of {sorted({*_GRID_KEYS, *_SCALAR_KEYS})}")
    family = table.get("family")
    if family not in _FAMILIES:
        raise SuiteError(f"{path}: key '{where}.family' must be {_SCALAR_KEYS['family'][1]}, got {family!r}")
    values = {k: _grid_values(path, where, k, v) for k, v in table.items() if k in _GRID_KEYS}
    if "modes" in values and any(m not in MODES for m in values["modes"]):
        raise SuiteError(f"{path}: key '{where}.modes' has {values['modes']}; expected {_GRID_KEYS['modes'][1]}")
    cases = _expand(path, where, family, values)
    return Grid(tuple(cases), tuple(values.get("modes", MODES)), tuple(values["impls"]) if "impls" in values else None)


def _token_counts(path: Path, where: str, values: dict) -> list[int]:
    if "N" in values and ("batch" in values or "seq" in values):
        raise SuiteError(f"{path}: '{where}' gives both N and batch/seq; expected one or the other")
    if "N" in values:
        return values["N"]
    if "batch" in values and "seq" in values:
        return [b * s for b in values["batch"] for s in values["seq"]]
    raise SuiteError(f"{path}: '{where}' needs N = [...] or both batch = [...] and seq = [...]")


def _expand(path: Path, where: str, family: str, values: dict) -> list[Case]:
    if family.endswith("linear") and "H" not in values:
        raise SuiteError(f"{path}: key '{where}.H' is missing; the linear family needs a list of hidden sizes")
    if not family.endswith("linear") and "H" in values:
        raise SuiteError(f"{path}: key '{where}.H' is for the linear families only")
    if not family.startswith("vocab_parallel") and "world_size" in values:
        raise SuiteError(f"{path}: key '{where}.world_size' is for the vocab_parallel families only")
    if "V" not in values:
        raise SuiteError(f"{path}: key '{where}.V' is missing; expected a list of positive integers")
    axes = {
        "N": _token_counts(path, where, values), "V": values["V"], "H": values.get("H", [None]),
        "dtype": values.get("dtype", ["float32"]), "reduction": values.get("reduction", ["mean"]),
        "ignore_frac": values.get("ignore_frac", [0.0]), "label_smoothing": values.get("label_smoothing", [0.0]),
        "z_loss": values.get("z_loss", [0.0]), "softcap": values.get("softcap", [None]), "seed": values.get("seed", [0]),
        "world_size": values.get("world_size", [None]), "distribution": values.get("distribution", ["gaussian"]),
        "take": values.get("take", [1]),
    }
    cases = []
    for combo in itertools.product(*axes.values()):
        kwargs = dict(zip(axes, combo, strict=True))
        for key in ("ignore_frac", "label_smoothing", "z_loss"):
            kwargs[key] = float(kwargs[key])
        if kwargs["softcap"] is not None:
            kwargs["softcap"] = float(kwargs["softcap"])
        if kwargs["N"] <= 0:  # an empty batch has nothing to time (the conformance matrix checks N=0)
            raise SuiteError(f"{path}: '{where}' makes an invalid case: N must be a positive integer, got {kwargs['N']}")
        try:
            cases.append(Case(family=family, **kwargs))
        except CaseError as exc:
            raise SuiteError(f"{path}: '{where}' makes an invalid case: {exc}") from exc
    return cases


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.toml"))
