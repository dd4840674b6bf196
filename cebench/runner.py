"""One cell: an implementation on a case, checked, then measured mode by mode.

A cell (cebench.sweep orders the cells of a suite and runs them in workers):
  1. skipped (unavailable) or unsupported rows, when the implementation cannot run it;
  2. agreement: a training call on fresh copies of the pristine inputs with a random
     upstream gradient, its loss and gradients compared with the float64 reference
     (computed once per case, on inputs no implementation has touched); if it agrees, a
     second call on the same copies, restored, with the upstream gradient the timing uses
     (ones by default), judged again; the copies are compared with the pristine inputs to
     see whether the implementation mutated them; then an evaluation call (no_grad);
  3. per mode: peak memory (one call on fresh copies), then time (repeated calls).
Setup stays out of the timed region: each mode is a zero-argument callable built
beforehand. Backward-mode time excludes the forward: each timed backward gets a fresh
forward, built untimed just before it. An implementation that disagrees is reported
loudly and every one of its timings in that case is marked untrusted; so is one that
overwrote its inputs although it declared mutates_inputs=False (checked after the
agreement calls and after every measured mode).
"""
from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterator

import torch

from cebench.agreement import badness
from cebench.cases import Case, differentiable_names, make_grad_output, make_inputs
from cebench.measure import Timing, TimingPlan, peak_memory, time_callable
from cebench.reference import compare, reference
from cebench.registry import Impl
from cebench.validate import check_inputs

MiB = float(1 << 20)
MUTATION_LIE = "mutated its inputs although declared mutates_inputs=False"
EVAL_MUTATION = "wrote into its inputs under no_grad"  # whatever it declares for training: eval loops reuse the logits


def impl_kwargs(impl: Impl, case: Case) -> dict:
    """Keyword arguments for a call: only the options the case sets."""
    kwargs = {"reduction": case.reduction, "ignore_index": -100}
    if case.label_smoothing:
        kwargs["label_smoothing"] = case.label_smoothing
    if case.z_loss:
        kwargs["z_loss"] = case.z_loss
    if case.softcap is not None:
        kwargs["softcap"] = case.softcap
    return kwargs


def fresh_inputs(pristine: dict[str, torch.Tensor], case: Case) -> dict[str, torch.Tensor]:
    """Copies of the pristine inputs, differentiable ones as leaves that require grad."""
    grads = differentiable_names(case)
    return {k: v.clone().requires_grad_(k in grads) for k, v in pristine.items()}


@functools.cache  # once per process: its first autocast call
def compile_without_caches_under_autocast() -> None:
    """torch 2.11's Inductor FX-graph and AOTAutograd caches, on disk and shared by every process, hand a graph
    compiled under one autocast dtype to a call under another: their keys lack it. Seen on the CPU: a compiled
    linear head's autocast-float16 call got the bf16 graph (CCE's compiled baseline: 9× fp16's error), and a fresh
    process's bf16 call got fp16's; with the caches off each compiles its own graph (Dynamo's guards do
    recompile), and torch 2.13 keys them right. So a process that calls under autocast never uses those caches:
    it compiles, in the untimed check and warm-up."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = False
    functorch_config.enable_autograd_cache = False


def call(impl: Impl, case: Case, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One call as training code makes it; under an autocast policy, inside torch.autocast (float32 inputs)."""
    names = (*differentiable_names(case), "targets")
    args = [inputs[n] for n in names]
    if case.autocast is None:
        return impl.fn(*args, **impl_kwargs(impl, case))
    compile_without_caches_under_autocast()
    with torch.autocast(args[0].device.type, dtype=case.autocast):
        return impl.fn(*args, **impl_kwargs(impl, case))


def evaluate(impl: Impl, case: Case, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss alone, as an evaluation loop computes it (validation loss, perplexity)."""
    with torch.no_grad():
        return call(impl, case, inputs)


def _backward(loss: torch.Tensor, grad_output: torch.Tensor) -> None:
    loss.backward(grad_output.to(loss.dtype))


def mode_callables(impl: Impl, case: Case, mode: str, inputs, pristine, grad_output):
    """(setup, measured): `setup()` runs untimed before every measured call `measured(setup())`.

    Backward mode's setup is the forward, so its time excludes the forward and every
    call gets a fresh graph. An implementation that overwrites its inputs gets them
    restored from the pristine copy in the setup of every call. Eval mode is the loss
    alone, as an evaluation loop computes it: under torch.no_grad(), on inputs that do
    not require grad (views of the same tensors, so a write into them is seen).
    """
    def refresh():
        if impl.mutates_inputs:
            with torch.no_grad():
                for name, tensor in inputs.items():
                    tensor.copy_(pristine[name])

    if mode == "eval":
        plain = {name: tensor.detach() for name, tensor in inputs.items()}
        return refresh, lambda _: evaluate(impl, case, plain)
    if mode == "forward":
        return refresh, lambda _: call(impl, case, inputs)
    if mode == "forward+backward":
        return refresh, lambda _: _backward(call(impl, case, inputs), grad_output)
    if mode == "backward":
        return (lambda: refresh() or call(impl, case, inputs)), (lambda loss: _backward(loss, grad_output))
    raise ValueError(f"unknown mode {mode!r}")


def timed_upstream_words(plan: TimingPlan) -> str:
    """How a check's reason names the upstream gradient of its second call: the one the timing uses."""
    return "upstream 1" if plan.upstream_grad == "ones" else "the same upstream"


class CellRunner:
    """Runs one implementation on one case and yields result rows."""

    def __init__(self, impl: Impl, case: Case, modes, device: str, plan: TimingPlan, pristine, ref, grad_output,
                 on_samples: Callable[[dict, list[float]], None]):
        self.impl, self.case, self.modes, self.device, self.plan = impl, case, modes, device, plan
        self.pristine, self.ref, self.grad_output, self.on_samples = pristine, ref, grad_output, on_samples
        self.trusted = True
        self.interpreted = impl.uses_triton and os.environ.get("TRITON_INTERPRET") == "1"

    def row(self, mode: str, metric: str, status: str = "ok", **values) -> dict:
        case = self.case
        return {
            "case": case.id, "family": case.family, "impl": self.impl.name, "mode": mode, "metric": metric,
            "status": status, "N": case.N, "V": case.V, "H": case.H, "dtype": case.dtype,
            "reduction": case.reduction, "ignore_frac": case.ignore_frac, "label_smoothing": case.label_smoothing,
            "z_loss": case.z_loss, "softcap": case.softcap, "device": self.device,
            "mutates_inputs": self.impl.mutates_inputs, "trusted": self.trusted and status == "ok",
            "grad_in_forward": self.impl.forward_computes_grad(case.reduction), "upstream_grad": self.plan.upstream_grad,
            "distribution": case.distribution, "model": case.model,
            **values,
        }

    def rows(self) -> Iterator[dict]:
        reason = self.impl.unavailable_reason()
        status = "skipped" if reason else "unsupported"
        reason = reason or self.impl.unsupported_reason(self.case, self.device.split(":")[0])
        if reason:
            yield from self._status_rows(status, reason)
            return
        check_rows, ran = self._check()
        yield from check_rows
        if not ran:
            yield from self._status_rows("skipped", "agreement check did not run", include_check=False)
            return
        measured = self._modes_to_measure()
        for mode in self.modes:
            if mode in measured:
                yield from self._measure(mode)
            else:
                yield self.row(mode, "time", "skipped", unit="ms", reason=INTERPRETER_SKIP)

    def _modes_to_measure(self) -> tuple[str, ...]:
        """Every mode; in the Triton interpreter only one (forward+backward where asked), measured once.

        Interpreter timings mean nothing and each call costs seconds: the check above is what
        the interpreter is for, and one measured mode shows the memory and that it runs.
        """
        if not self.interpreted:
            return tuple(self.modes)
        return ("forward+backward",) if "forward+backward" in self.modes else tuple(self.modes[-1:])

    def _status_rows(self, status: str, reason: str, include_check: bool = True) -> Iterator[dict]:
        if include_check:
            yield self.row("check", "agreement", status, unit="bool", reason=reason)
        for mode in self.modes:
            yield self.row(mode, "time", status, unit="ms", reason=reason)

    def _check(self) -> tuple[list[dict], bool]:
        """The agreement calls (training: forward and backward, twice) and the evaluation call, on fresh copies.

        Everything only the check needs (the float64 reference, the call's outputs) is dropped
        before timing starts; an out-of-memory anywhere in here is an `oom` row, never a harness error.
        """
        try:
            rows, ok = self._agreement_rows()
            if ok:
                rows.append(self._eval_row())
        except Exception as exc:
            self.trusted = False
            return [self.row("check", "agreement", _failure_status(exc), unit="bool", reason=_describe(exc))], False
        finally:
            if self.ref is not None:
                self.ref.release()
            self.ref = None
            free_cuda_cache(self.device)
        return rows, True

    def _agreement_rows(self) -> tuple[list[dict], bool]:
        """Two training calls on the same fresh copies: the first with the check's random upstream gradient
        (a kernel that ignores it fails), the second with the one the timing uses (ones by default, what
        `loss.backward()` on a mean loss gives: the fast path some kernels take is the one timed, so it is
        the one checked), which also catches a kernel right only on its first call (stale workspaces).
        The figures are each quantity's worse of the two calls; a call that raises ends the cell there."""
        inputs = fresh_inputs(self.pristine, self.case)
        what = timed_upstream_words(self.plan)
        try:
            judged = self._training_call(inputs, self.grad_output, self.ref)
            mutated = mutated_inputs(inputs, self.pristine)
            ok = all(a.ok for a in judged)
            reason = ("agrees: " if ok else "DISAGREES with float64 reference: ") + max(judged, key=_badness).describe()
        except Exception as exc:
            return self._raised(_describe(exc), exc)
        if ok:
            try:
                second = self._second_call(inputs)
                mutated = sorted({*mutated, *mutated_inputs(inputs, self.pristine)})
            except Exception as exc:
                return self._raised(f"the second call ({what}) raised: {_describe(exc)}", exc)
            ok = all(a.ok for a in second)
            if ok:
                judged = [max(pair, key=_badness) for pair in zip(judged, second, strict=True)]
                reason = f"agrees: {max(judged, key=_badness).describe()}; a second call at {what} agrees too"
            else:  # the figures beside the FAIL are the failing call's
                judged = second
                reason = (f"DISAGREES with float64 reference on a second call at {what} (the first agreed): "
                          f"{max(second, key=_badness).describe()}")
        self.trusted = ok and not self.interpreted
        lied = bool(mutated) and not self.impl.mutates_inputs
        if lied:  # its timing loops reuse inputs it has overwritten: they measure something else
            self.trusted = False
            reason = f"{MUTATION_LIE} (mutated: {', '.join(mutated)}); {reason}"
        # rows made after the verdict: a row's `trusted` is the cell's as the check left it
        rows = [row for a in judged for row in self._agreement_values(a)]
        rows.append(self.row("check", "agreement", "ok" if ok and not lied else "failed", unit="bool",
                             value=float(ok and not lied), reason=reason))
        rows.append(self.row("check", "mutates_input", unit="bool", value=float(bool(mutated)),
                             reason=("mutated: " + ", ".join(mutated)) if mutated else ""))
        return rows, True

    def _raised(self, reason: str, exc: BaseException) -> tuple[list[dict], bool]:
        """A check call raised (out of memory: `oom`): its row alone, and no evaluation call follows; the modes are
        still tried, untrusted, as for every cell whose check failed (each one's own status: oom, failed or ok)."""
        self.trusted = False
        return [self.row("check", "agreement", _failure_status(exc), unit="bool", reason=reason)], False

    def _training_call(self, inputs, grad_output, ref) -> list:
        """One forward and backward with `grad_output` upstream, judged against `ref`."""
        loss = call(self.impl, self.case, inputs)
        _backward(loss, grad_output)
        outputs = {"loss": loss.detach(), **{n: inputs[n].grad for n in differentiable_names(self.case)}}
        return compare(outputs, ref, self.case.dtype)

    def _second_call(self, inputs) -> list:
        """The second training call, at the timed upstream gradient, on the copies restored: its agreements."""
        timed = self.plan.timed_grad(self.grad_output)
        second = self.ref.with_upstream(timed)
        if second is not self.ref:  # the first's float64 gradients (linear family) go before the second's are made
            self.ref.release()
        self.ref = second
        with torch.no_grad():  # a kernel that writes its gradient into its inputs (declared) gets them back
            for name, tensor in inputs.items():
                tensor.copy_(self.pristine[name])
                tensor.grad = None
        return self._training_call(inputs, timed, self.ref)

    def _agreement_values(self, a) -> list[dict]:
        """The figures of one agreement: errors, and the accuracy against what the dtype allows."""
        rows = [self.row("check", f"max_abs_err[{a.quantity}]", unit="abs", value=a.max_abs_err),
                self.row("check", f"rel_err[{a.quantity}]", unit="rel", value=a.rel_err),
                self.row("check", f"accuracy[{a.quantity}]", unit="x best", value=a.accuracy, reason=a.describe())]
        if a.quantity != "loss":
            rows.append(self.row("check", f"row_accuracy[{a.quantity}]", unit="x best", value=a.row_accuracy,
                                 reason=f"worst row {a.worst_row}"))
            rows.append(self.row("check", f"col_accuracy[{a.quantity}]", unit="x best", value=a.col_accuracy,
                                 reason=f"worst column {a.worst_col}"))
            rows.append(self.row("check", f"bias[{a.quantity}]", unit="half-ulps", value=a.bias,
                                 reason=f"t = {a.bias_t:.1f}"))
        if a.target_rel_err is not None:
            rows.append(self.row("check", f"target_accuracy[{a.quantity}]", unit="u", value=a.target_accuracy,
                                 reason=f"target-class entries: rel {a.target_rel_err:.2e}"))
        return rows

    def _eval_row(self) -> dict:
        """An evaluation call (no_grad, inputs not requiring grad): the loss agrees, the inputs stay untouched
        whatever the implementation declares for training (eval loops reuse the logits)."""
        inputs = {k: v.clone() for k, v in self.pristine.items()}
        try:
            loss = evaluate(self.impl, self.case, inputs)
        except Exception as exc:
            self.trusted = False
            return self.row("check", "eval_agreement", _failure_status(exc), unit="bool", reason=f"eval: {_describe(exc)}")
        agreement = compare({"loss": loss.detach()}, _LossOnly(self.ref), self.case.dtype)[0]
        mutated = mutated_inputs(inputs, self.pristine)
        ok = agreement.ok and not mutated
        self.trusted = self.trusted and ok
        reason = ("eval agrees: " if agreement.ok else "eval DISAGREES with float64 reference: ") + agreement.describe()
        if mutated:
            reason = f"eval {EVAL_MUTATION} (mutated: {', '.join(mutated)}); {reason}"
        return self.row("check", "eval_agreement", "ok" if ok else "failed", unit="bool", value=float(ok), reason=reason)

    def _measure(self, mode: str) -> Iterator[dict]:
        # the interpreter runs kernels on numpy copies: neither their time nor torch's allocator view is real
        note = "Triton interpreter on CPU: timing and memory not meaningful" if self.interpreted else ""
        try:
            inputs = fresh_inputs(self.pristine, self.case)
            setup, measured = mode_callables(self.impl, self.case, mode, inputs, self.pristine,
                                              self.plan.timed_grad(self.grad_output))
            began = time.perf_counter()
            memory = peak_memory(measured, self.device, self.case.input_bytes(), setup=setup)
            if self.interpreted:  # one interpreted call costs seconds and its time means nothing: reuse it
                timing = Timing([(time.perf_counter() - began) * 1e3])
            else:
                leaves = [inputs[n] for n in differentiable_names(self.case)]
                needs_setup = mode == "backward" or self.impl.mutates_inputs
                timing = time_callable(measured if needs_setup else (lambda: measured(None)), self.device,
                                       self.plan, grad_to_none=leaves, setup=setup if needs_setup else None)
        except Exception as exc:
            yield self.row(mode, "time", _failure_status(exc), unit="ms", reason=_describe(exc))
            return
        finally:
            free_cuda_cache(self.device)
        key = {"impl": self.impl.name, "case": self.case.id, "mode": mode}
        self.on_samples(key, timing.samples_ms)
        mutated = [] if self.impl.mutates_inputs else mutated_inputs(inputs, self.pristine)
        if mutated:  # checked after every measured mode, not only in the agreement call
            self.trusted = False
            yield self.row(mode, "mutates_input", "failed", unit="bool", value=1.0,
                           reason=f"{MUTATION_LIE} (mutated: {', '.join(mutated)} while timing {mode})")
        yield self.row(mode, "peak_memory", unit="MiB", value=memory.peak_bytes / MiB,
                       reason="above the inputs" + (f"; {note}" if note else ""))
        yield self.row(mode, "total_memory", unit="MiB", value=memory.total_bytes / MiB, reason="inputs + peak")
        # the time row comes last: its presence marks the mode finished (see --resume)
        yield self.row(mode, "time", unit="ms", value=timing.median, p20=timing.quantile(0.2),
                       p80=timing.quantile(0.8), n=len(timing.samples_ms), reason=note)


class _LossOnly:
    """A view of a reference that asks only for the loss (the evaluation check has no gradients)."""

    def __init__(self, ref):
        self._ref, self.names = ref, ("loss",)

    def __getattr__(self, name):
        return getattr(self._ref, name)


def _badness(a) -> float:
    """How far an agreement is from failing (above 1: failed): picks the one a row's reason names."""
    if a.ok:
        return badness(a)
    return math.inf if not math.isfinite(a.accuracy) else 1 + badness(a)


INTERPRETER_SKIP = "Triton interpreter on CPU: only forward+backward is measured (timings not meaningful)"


def _failure_status(exc: BaseException) -> str:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(exc):
        return "oom"
    return "failed"


def mutated_inputs(inputs: dict[str, torch.Tensor], pristine: dict[str, torch.Tensor]) -> list[str]:
    """Names of the inputs whose values differ from the pristine copy (NaN equals NaN)."""
    changed = []
    for name, original in pristine.items():
        now = inputs[name].detach()
        if now.shape != original.shape:
            same = False
        elif now.is_floating_point():
            same = torch.equal(now, original) or bool(((now == original) | (now.isnan() & original.isnan())).all())
        else:
            same = torch.equal(now, original)
        if not same:
            changed.append(name)
    return changed


def free_cuda_cache(device: str) -> None:
    """Hand cached blocks back between measurements. After an illegal access or a device-side assert the
    context is unusable and this raises the same error again: swallowed here, so the failure row that
    names the cause survives (raising in a `finally` would replace it with this one); the worker then
    finds the context poisoned and is restarted (cebench.isolate)."""
    if device.startswith("cuda"):
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001, S110 - reported by the row already being returned
            pass


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:500]


def case_data(case: Case, device: str):
    """Pristine inputs (validated before any implementation sees them), float64 reference, upstream gradient."""
    pristine = make_inputs(case, device)
    check_inputs(case, pristine)
    grad_output = make_grad_output(case, device)
    return pristine, reference(case, pristine, grad_output), grad_output


def cell_task(impl: Impl, case: Case, modes, device: str, plan: TimingPlan) -> Iterator[tuple]:
    """Inside a worker: one cell's rows and samples, as messages for the parent."""
    samples = []
    if impl.unavailable_reason() or impl.unsupported_reason(case, device.split(":")[0]):
        pristine = ref = grad_output = None  # only status rows follow: no inputs, no float64 reference
    else:
        pristine, ref, grad_output = case_data(case, device)
    runner = CellRunner(impl, case, modes, device, plan, pristine, ref, grad_output,
                        lambda key, s: samples.append((key, s)))
    for row in runner.rows():
        while samples:
            yield ("samples", *samples.pop(0))
        yield ("row", row)


