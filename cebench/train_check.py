"""`python -m cebench train-check`: does training with an implementation as its loss follow the float32 reference?

The float64 agreement check looks at one call. Some errors only matter over many steps: a
gradient a few percent off, grad_weight accumulated in bf16, a bias that averages out of one
call but not out of training. So a tiny causal language model (cebench.train_model) is trained
for K steps on real text with each implementation as its loss (logits family: the output
layer's logits; linear family: the (hidden, weight) pair), from the same seed, on the same
batches, and each run is compared with the float32 reference run (F.cross_entropy on the
float32 logits): the largest deviation of its loss curve, its final loss (and the reference
loss of its final model on held-out text), and how far its weights drifted, as a fraction of
how far training moved them: |w - w_ref| / |w_ref - w_0|.

Tolerance. Training amplifies rounding, so no fixed number is right at every size; the noise
floor is measured in the same run by three control runs that are as correct as the reference
and differ from it only in rounding: the reference run again (catches non-deterministic
kernels), the head's matmul with its hidden dimension permuted (another summation order), and
the loss in float64. Under --dtype bfloat16 (or float16, or autocast) the controls see their
inputs, and return their loss, in that precision, so the floor is what the precision itself
costs a correct loss. The floor is the largest control deviation (never below one float32 ulp of
the loss, nor float32's epsilon for the drift); an implementation drifts when its loss deviation
or its weight drift exceeds the factor times the floor. The factors come from the CPU size
(60 steps, 512 tokens a step, dim 64):
  - float32, FACTOR = 100: correct implementations sit at up to 1 floor in loss (7e-7 nats) and
    1.5 floors in drift (4e-7); grad_weight accumulated in bf16 is 750 floors off in loss (6e-4
    nats) and 7800 in drift (2e-3); a gradient 2% too small 57000 and 59000 floors. 100 is about
    the geometric middle of 1.5 and 7800: 70x above the worst correct one, 7.5x (loss) and 78x
    (drift) below the subtler plant.
  - lower precisions, LOW_PRECISION_FACTOR = 3: the floor is 4 orders higher (bf16: 3.5e-2 nats,
    drift 2e-3, mostly the loss value's own rounding and the rounded weights), correct
    implementations reach 1.2 floors in drift and a gradient 2% too small only 7.6: 3 leaves a
    factor of 2.5 on both sides. In low precision, read the drift column; the loss column mostly
    shows the rounding of the loss value.

Each implementation trains in a worker process of its own (cebench.isolate), as in `run`: a
crash or an exception is that implementation's `failed` row and the others go on. Under the
Triton interpreter (no GPU), Triton implementations train for --interp-steps only, and are
compared with the reference over as many steps. Writes summary.md, curves.png, curves.json and
env.json into reports/train-check/<stamp>/ (or --out).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from cebench.cases import Case
from cebench.isolate import Worker, WorkerDied, source_file
from cebench.registry import Impl
from cebench.results import REPO, environment
from cebench.runner import call
from cebench.train_model import TrainConfig, load_corpus, reference_loss, train

FACTOR = 100.0  # float32: tolerance in noise floors
LOW_PRECISION_FACTOR = 3.0  # bfloat16, float16 and autocast: the floor is bf16's own cost, much closer to real drift
CONTROLS = ("reference again", "hidden dim permuted", "float64 loss")
FAMILIES = ("logits", "linear")
_EPS32 = torch.finfo(torch.float32).eps


class ReferenceFailed(RuntimeError):
    pass


@dataclass
class Run:
    """One training run: an implementation's, the reference's or a control's."""

    name: str
    family: str = ""
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    eval_loss: float = math.nan
    weights: dict[int, torch.Tensor] = field(default_factory=dict)  # step count -> flat float64 weights
    status: str = "ok"  # ok | failed | skipped | unsupported
    reason: str = ""


@dataclass
class Verdict:
    name: str
    family: str
    steps: int
    max_dev: float  # nats, largest |loss - reference loss| over the steps
    final_loss: float
    eval_loss: float
    drift: float  # |w - w_ref| / |w_ref - w_0| after `steps`
    tol_dev: float
    tol_drift: float
    verdict: str  # ok | DRIFTS | failed: ... | skipped: ... | control


# ---------------------------------------------------------------- the loss functions trained with


def case_for(impl_family: str, cfg: TrainConfig) -> Case:
    linear = impl_family == "linear"
    return Case(impl_family, N=cfg.tokens, V=256, H=cfg.model_dim if linear else None, dtype=cfg.dtype)


def impl_loss(impl: Impl, cfg: TrainConfig):
    """The implementation as a training loss, called through cebench.runner.call like every other caller."""
    case = case_for(impl.family, cfg)
    dtype = case.torch_dtype

    def loss(hidden, head, targets):
        if impl.family == "linear":
            inputs = {"hidden": hidden.to(dtype), "weight": head.to(dtype), "targets": targets}
        else:
            inputs = {"logits": F.linear(hidden, head).to(dtype), "targets": targets}
        return call(impl, case, inputs).float()
    return loss


def control_loss(name: str, cfg: TrainConfig):
    """A loss as correct as the reference, rounded differently; in the precision the implementations run in."""
    low = getattr(torch, case_for("logits", cfg).precision)
    if name == "reference again":
        return reference_loss
    if name == "hidden dim permuted":
        perm = torch.randperm(cfg.model_dim, generator=torch.Generator().manual_seed(cfg.seed + 1)).to(cfg.device)
        return lambda h, w, t: F.cross_entropy(F.linear(h.to(low)[:, perm], w.to(low)[:, perm]), t).float()
    if name == "float64 loss":  # the loss value rounded to `low`, as the implementations return it
        return lambda h, w, t: F.cross_entropy(F.linear(h, w).to(low).double(), t).to(low).float()
    raise ValueError(f"unknown control {name!r}")


def train_task(impl: Impl, *, cfg: TrainConfig, which: str, steps: int, snapshots: tuple[int, ...]):
    """Inside a worker (or inline): one training run; `which` is "impl", "reference" or a control's name."""
    loss = impl_loss(impl, cfg) if which == "impl" else reference_loss if which == "reference" else control_loss(which, cfg)
    result = train(cfg, load_corpus(cfg.corpus_bytes), loss, steps, snapshots)
    weights = {k: v.float().numpy() for k, v in result.weights.items()}  # numpy pickles without shared memory
    yield ("result", {"losses": result.losses, "eval_loss": result.eval_loss, "weights": weights})


# ---------------------------------------------------------------- running


def interpreted(impl: Impl) -> bool:
    return impl.uses_triton and os.environ.get("TRITON_INTERPRET") == "1"


def steps_for(impl: Impl, cfg: TrainConfig, interp_steps: int) -> int:
    return min(cfg.steps, interp_steps) if interpreted(impl) else cfg.steps


class _Runner:
    """Training runs, each in the worker process of its implementation's file (reused, restarted after a crash),
    or inline; a failure is that run's `failed` status."""

    def __init__(self, isolate: bool, plugins, device: str, log_dir: Path, timeout: float | None):
        self.isolate, self.plugins, self.device, self.timeout = isolate, list(plugins), device, timeout
        self.log_dir = log_dir
        self.workers: dict[str, Worker] = {}

    def _messages(self, impl: Impl, kwargs: dict) -> list[tuple]:
        if not self.isolate:
            return list(train_task(impl, **kwargs))
        source = source_file(impl)
        if source not in self.workers:
            self.workers[source] = Worker(source, self.plugins, self.device, self.log_dir / f"{Path(source).stem}.log")
        return list(self.workers[source].run(("cebench.train_check", "train_task", impl.name, kwargs), self.timeout))

    def __call__(self, impl: Impl, name: str, family: str, **kwargs) -> Run:
        out = Run(name, family, kwargs["steps"])
        try:
            messages = self._messages(impl, kwargs)
        except WorkerDied as death:
            return replace(out, status="failed", reason=death.reason)
        except Exception as exc:  # inline: the implementation raised
            return replace(out, status="failed", reason=f"{type(exc).__name__}: {exc}")
        for message in messages:
            if message[0] == "error":
                return replace(out, status="failed", reason=message[2])
            if message[0] == "result":
                data = message[1]
                weights = {k: torch.from_numpy(v).double() for k, v in data["weights"].items()}
                return replace(out, losses=data["losses"], eval_loss=data["eval_loss"], weights=weights)
        return replace(out, status="failed", reason="the worker sent no result")

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()


def run_all(impls: list[Impl], cfg: TrainConfig, *, interp_steps: int, isolate: bool, plugins=(),
            log_dir: Path, timeout: float | None = None, log=print) -> tuple[Run, list[Run], list[Run]]:
    """(reference, controls, one run per implementation of the logits and linear families)."""
    impls = [i for i in impls if i.family in FAMILIES]
    lengths = tuple(sorted({steps_for(i, cfg, interp_steps) for i in impls} | {cfg.steps}))
    run = _Runner(isolate, plugins, cfg.device, log_dir, timeout)
    try:
        return _run_all(run, impls, cfg, interp_steps, lengths, log)
    finally:
        run.close()


def _run_all(run: _Runner, impls: list[Impl], cfg: TrainConfig, interp_steps: int, lengths, log):
    host = _host_impl(impls)  # the file whose worker trains the reference and the controls
    log(f"train-check: reference ({cfg.steps} steps, {cfg.tokens} tokens per step)")
    ref = run(host, "reference", "", cfg=cfg, which="reference", steps=cfg.steps, snapshots=lengths)
    if ref.status != "ok":
        raise ReferenceFailed(f"the float32 reference run failed, nothing to compare with: {ref.reason}")
    controls = []
    for name in CONTROLS:
        log(f"train-check: control: {name}")
        controls.append(run(host, name, "control", cfg=cfg, which=name, steps=cfg.steps, snapshots=lengths))
    results = []
    for impl in impls:
        steps = steps_for(impl, cfg, interp_steps)
        reason = impl.unavailable_reason()
        status = "skipped" if reason else "unsupported"
        reason = reason or impl.unsupported_reason(case_for(impl.family, cfg), cfg.device.split(":")[0])
        if reason:
            results.append(Run(impl.name, impl.family, steps, status=status, reason=reason))
            continue
        log(f"train-check: {impl.name} ({steps} steps{', Triton interpreter' if interpreted(impl) else ''})")
        results.append(run(impl, impl.name, impl.family, cfg=cfg, which="impl", steps=steps, snapshots=()))
    return ref, controls, results


def _host_impl(impls: list[Impl]) -> Impl:
    from cebench import registry

    return registry.registry().get("torch") or impls[0]


# ---------------------------------------------------------------- judging


def max_deviation(run: Run, ref: Run, steps: int) -> float:
    pairs = list(zip(run.losses[:steps], ref.losses[:steps], strict=False))
    if len(pairs) < steps or not all(math.isfinite(a) for a, _ in pairs):
        return math.inf  # ended early on a non-finite loss
    return max((abs(a - b) for a, b in pairs), default=0.0)


def weight_drift(run: Run, ref: Run, steps: int) -> float:
    if steps not in run.weights or steps not in ref.weights:
        return math.inf
    moved = (ref.weights[steps] - ref.weights[0]).norm().item()
    return (run.weights[steps] - ref.weights[steps]).norm().item() / max(moved, 1e-30)


def floors(ref: Run, controls: list[Run], steps: int) -> tuple[float, float]:
    """(loss, drift) noise floors over the first `steps` steps: the largest control deviations, at least an ulp."""
    ok = [c for c in controls if c.status == "ok"]
    dev = max([max_deviation(c, ref, steps) for c in ok], default=0.0)
    drift = max([weight_drift(c, ref, steps) for c in ok], default=0.0)
    return max(dev, _EPS32 * max(ref.losses[:steps])), max(drift, _EPS32)


def default_factor(cfg: TrainConfig) -> float:
    return FACTOR if case_for("logits", cfg).precision == "float32" else LOW_PRECISION_FACTOR


def judge(ref: Run, controls: list[Run], runs: list[Run], factor: float = FACTOR) -> list[Verdict]:
    """A verdict per control and implementation run (controls against their own floor are shown as "control")."""
    verdicts = []
    for run in [*controls, *runs]:
        floor_dev, floor_drift = floors(ref, controls, run.steps)
        tol_dev, tol_drift = factor * floor_dev, factor * floor_drift
        if run.status != "ok":
            verdicts.append(Verdict(run.name, run.family, run.steps, math.nan, math.nan, math.nan, math.nan,
                                    tol_dev, tol_drift, f"{run.status}: {run.reason}"))
            continue
        dev, drift = max_deviation(run, ref, run.steps), weight_drift(run, ref, run.steps)
        if run.family == "control":
            verdict = "control"
        else:
            verdict = "ok" if dev <= tol_dev and drift <= tol_drift else "DRIFTS"
        verdicts.append(Verdict(run.name, run.family, run.steps, dev, run.losses[-1], run.eval_loss, drift,
                                tol_dev, tol_drift, verdict))
    return verdicts


# ---------------------------------------------------------------- the command


def add_arguments(p) -> None:
    d = TrainConfig()
    p.add_argument("--impl", help="comma-separated implementation names (default: every logits and linear one)")
    p.add_argument("--plugin", action="append", default=[], help="plugin .py file or module name (repeatable)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--interp-steps", type=int, default=10,
                   help="steps for Triton implementations under the Triton interpreter (default 10)")
    p.add_argument("--batch", type=int, default=d.batch, help=f"sequences per step (default {d.batch})")
    p.add_argument("--seq", type=int, default=d.seq, help=f"tokens per sequence (default {d.seq})")
    p.add_argument("--model-dim", type=int, default=d.model_dim, help=f"hidden size (default {d.model_dim})")
    p.add_argument("--layers", type=int, default=d.layers, help=f"transformer blocks (default {d.layers})")
    p.add_argument("--heads", type=int, default=d.heads, help=f"attention heads (default {d.heads})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"SGD learning rate (default {d.lr})")
    p.add_argument("--dtype", default=d.dtype, help="dtype of the loss's inputs: float32 (default), bfloat16, float16, "
                                                   "autocast-bfloat16, autocast-float16; the model trains in float32")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--corpus-bytes", type=int, default=d.corpus_bytes, help="bytes of standard-library source to use")
    p.add_argument("--factor", type=float, help=f"tolerance in noise floors (default {FACTOR:g} for float32, "
                                                 f"{LOW_PRECISION_FACTOR:g} for lower precisions)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one training run may take (default 1800)")
    p.add_argument("--no-isolate", action="store_true", help="train in this process (debugging: a crash ends it)")
    p.add_argument("--out", help="folder for the summary (default: reports/train-check/<time>-<device>/)")


def config_from(args, device: str) -> TrainConfig:
    sizes = {k: getattr(args, k) for k in ("steps", "batch", "seq", "model_dim", "layers", "heads", "corpus_bytes")}
    bad = [f"--{k.replace('_', '-')}" for k, v in sizes.items() if v < 1] + ["--interp-steps"] * (args.interp_steps < 1)
    if bad or args.model_dim % args.heads or not args.lr > 0:
        raise ValueError(f"train-check needs positive sizes and learning rate, and --model-dim a multiple of --heads; "
                         f"check {', '.join(bad) or '--model-dim/--heads/--lr'}")
    cfg = TrainConfig(**sizes, lr=args.lr, seed=args.seed, dtype=args.dtype, device=device)
    case_for("linear", cfg)  # a bad --dtype is a CaseError here, before anything trains
    return cfg


def command(args, impls: list[Impl], device: str, log=print) -> int:
    """Train, judge, write the summary; 0 when every implementation that ran followed the reference, else 1."""
    from cebench.train_report import write

    cfg = config_from(args, device)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else REPO / "reports" / "train-check" / f"{stamp}-{device.replace(':', '')}"
    try:
        ref, controls, runs = run_all(impls, cfg, interp_steps=args.interp_steps, isolate=not args.no_isolate,
                                      plugins=args.plugin, log_dir=out / "logs", timeout=args.timeout or None, log=log)
    except ReferenceFailed as exc:
        log(f"train-check: {exc}")
        return 1
    factor = args.factor or default_factor(cfg)
    verdicts = judge(ref, controls, runs, factor)
    corpus = load_corpus(cfg.corpus_bytes)
    env = environment(device, "train-check", "", [sys.executable, "-m", "cebench", *sys.argv[1:]])
    env.update(config=asdict(cfg), interp_steps=args.interp_steps, factor=factor, corpus_files=corpus.files,
               corpus_sha256=corpus.sha256)
    summary = write(out, cfg, env, ref, controls, runs, verdicts)
    print(summary.read_text(), end="")
    log(f"train-check: summary {summary} (curves.png, curves.json)")
    bad = [v for v in verdicts if v.verdict == "DRIFTS" or v.verdict.startswith("failed")]
    return 1 if bad else 0
