"""What the first GPU run relies on, checked on the CPU: how calls are made and timed, limits, planning.

- the timed backward gets the upstream gradient training gives (ones), the agreement check a random one;
- eval mode is the loss alone under no_grad on inputs that do not require grad;
- an autocast dtype policy runs the call under torch.autocast on float32 inputs and is recorded;
- the float64 reference is dropped before timing starts;
- a stuck cell on CUDA gives up after 180 s by default;
- the run-time model covers every shipped suite and counts do_bench's calls as cebench.measure makes them.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cebench import cli, estimate, suites
from cebench.cases import Case
from cebench.measure import TimingPlan
from cebench.registry import load_file, registry
from cebench.runner import CellRunner, case_data

ROOT = Path(__file__).resolve().parent.parent
load_file(ROOT / "tests" / "plugins" / "record_calls.py")
RECORD = sys.modules["cebench_plugin_record_calls"]
PLAN = TimingPlan(warmup=1, min_repeats=2, max_repeats=2, min_time_s=0.0)


def _run_cell(case, modes, plan=PLAN):
    RECORD.CALLS.clear()
    pristine, ref, grad_output = case_data(case, "cpu")
    runner = CellRunner(registry()["record_calls"], case, modes, "cpu", plan, pristine, ref, grad_output,
                        lambda key, samples: None)
    rows = list(runner.rows())
    return runner, rows, grad_output


def test_timed_backward_gets_ones_and_the_check_a_random_gradient():
    runner, rows, grad_output = _run_cell(Case("logits", N=16, V=33), ("forward+backward",))
    grads = [c["backward_grad"] for c in RECORD.CALLS if "backward_grad" in c]
    assert float(grads[0]) == float(grad_output) != 1.0  # the agreement's first call: random, never 1
    assert len(grads) > 2 and all(float(g) == 1.0 for g in grads[1:])  # its second and every timed call: 1
    assert {r["upstream_grad"] for r in rows} == {"ones"}


def test_random_upstream_gradient_when_the_suite_asks():
    plan = TimingPlan(**{**PLAN.__dict__, "upstream_grad": "random"})
    _, rows, grad_output = _run_cell(Case("logits", N=16, V=33), ("forward+backward",), plan)
    grads = [float(c["backward_grad"]) for c in RECORD.CALLS if "backward_grad" in c]
    assert set(grads) == {float(grad_output)}
    assert {r["upstream_grad"] for r in rows if r["mode"] != "check"} == {"random"}


def test_eval_mode_is_the_loss_alone_under_no_grad():
    _, rows, _ = _run_cell(Case("logits", N=16, V=33), ("eval",))
    # after the agreement's two training calls and the eval check
    timed = [c for c in RECORD.CALLS if "grad_enabled" in c][3:]
    assert timed and all(not c["grad_enabled"] and not c["requires_grad"] for c in timed)
    assert not any("backward_grad" in c for c in RECORD.CALLS[4:])
    eval_check = [r for r in rows if r["metric"] == "eval_agreement"]
    assert len(eval_check) == 1 and eval_check[0]["status"] == "ok"
    assert [r["status"] for r in rows if r["metric"] == "time"] == ["ok"]


def test_autocast_policy_runs_under_autocast_on_float32_inputs(tmp_path):
    path = tmp_path / "ac.toml"
    path.write_text('name = "ac"\n[[sweep]]\nfamily = "logits"\nN = [16]\nV = [33]\ndtype = ["autocast-bfloat16"]\n')
    case = next(suites.load(str(path)).cells())[0]
    assert case.autocast == torch.bfloat16 and case.torch_dtype == torch.float32 and case.precision == "bfloat16"
    _, rows, _ = _run_cell(case, ("forward",))
    calls = [c for c in RECORD.CALLS if "autocast" in c]
    assert calls and all(c["autocast"] and c["dtype"] == torch.float32 for c in calls)
    assert {r["dtype"] for r in rows} == {"autocast-bfloat16"}


def test_reference_is_dropped_before_timing():
    runner, rows, _ = _run_cell(Case("logits", N=16, V=33), ("forward",))
    assert runner.ref is None and any(r["metric"] == "time" and r["status"] == "ok" for r in rows)


def test_cuda_default_timeout_is_180_s_and_cpu_600():
    assert cli.default_timeout("cuda") == cli.default_timeout("cuda:1") == 180.0
    assert cli.default_timeout("cpu") == 600.0


@pytest.mark.parametrize("t_ms,plan", [(0.01, TimingPlan()), (500.0, TimingPlan(min_repeats=5, cuda_rep_ms=50.0))])
def test_estimate_counts_at_least_min_repeats(t_ms, plan):
    calls = estimate.timing_calls(t_ms, plan)
    assert calls >= 1 + 1 + 1 + plan.min_repeats


def test_estimate_counts_the_calls_measure_makes(monkeypatch):
    # the model's count against the real timing code driven by fake CUDA events, on both of its paths
    import triton.testing

    from cebench import measure

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def elapsed_time(self, other):
            return t_ms

    class DoBench:  # triton's: 1 + 5 sizing calls, warm-up and repeats sized from the call's time
        def __call__(self, fn, warmup=25, rep=100, grad_to_none=None, return_mode="mean"):
            n = 1 + 5 + max(1, int(warmup / t_ms)) + max(1, int(rep / t_ms))
            for _ in range(n):
                fn()
            return [t_ms] * max(1, int(rep / t_ms))

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(measure, "l2_flush_buffer", lambda: type("F", (), {"zero_": lambda self: None})())
    monkeypatch.setattr(triton.testing, "do_bench", DoBench())
    plan = TimingPlan(min_repeats=5, cuda_warmup_ms=10.0, cuda_rep_ms=50.0)
    for t_ms in (0.2, 4.0, 12.0, 300.0):
        calls = []
        measure.time_callable(lambda made=calls: made.append(1), "cuda", plan)
        assert len(calls) == estimate.timing_calls(t_ms, plan), t_ms


def test_every_shipped_suite_has_an_estimate():
    impls = {"triton_fused": "logits", "torch": "logits", "triton_fused_linear": "linear", "vp_allreduce": "vocab_parallel"}
    for name in suites.available_suites():
        total, cells = estimate.suite_estimate(suites.load(name), impls)
        assert total > 0 and cells, name


def test_runs_with_no_network(tmp_path):
    """Nothing at run time reaches the network: a run with every internet socket refused still agrees."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import socket\n_connect = socket.socket.connect\n"
                       "def connect(self, address):\n"
                       "    if self.family in (socket.AF_INET, socket.AF_INET6):\n"
                       "        raise OSError('network refused by the test')\n"
                       "    return _connect(self, address)\n"
                       "socket.socket.connect = connect\n")
    suite = tmp_path / "s.toml"
    suite.write_text('name = "offline"\n[timing]\nmin_repeats = 1\nmax_repeats = 1\nwarmup = 0\n'
                     '[[sweep]]\nfamily = "logits"\nN = [8]\nV = [33]\nmodes = ["forward"]\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "cebench", "run", "--suite", str(suite), "--impl", "torch,chunked",
                          "--out", str(tmp_path / "runs"), "--no-report"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_runs_from_a_checkout_without_install(tmp_path):
    """`PYTHONPATH=<checkout> python -m cebench` works without `pip install`: -S skips site's .pth files, so the
    editable install is not seen; torch and the other dependencies come from their own directory."""
    deps = {str(Path(m.__file__).resolve().parent.parent) for m in (torch, __import__("pandas"), __import__("triton"))}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *deps])}
    out = subprocess.run([sys.executable, "-S", "-c", "import cebench, runpy, sys; print(cebench.__file__); "
                          "sys.argv = ['cebench', 'list']; runpy.run_module('cebench', run_name='__main__')"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0].startswith(str(ROOT)) and "triton_fused" in out.stdout


def test_a_poisoned_cuda_context_keeps_the_failure_row(monkeypatch):
    # after an illegal access, empty_cache() raises the same sticky error: it must not replace the row
    # that names the cause (the worker is restarted afterwards, cebench.isolate._cuda_poisoned)
    from cebench import runner

    def sticky():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")

    monkeypatch.setattr(torch.cuda, "empty_cache", sticky)
    runner.free_cuda_cache("cuda:0")  # swallowed
    runner.free_cuda_cache("cpu")


def test_a_harness_error_is_reported_by_its_exception_not_the_tracebacks_last_line(monkeypatch, tmp_path, impls):
    # a CUDA error's message spans lines and ends in advice ("Compile with TORCH_USE_CUDA_DSA ...");
    # the worker sends the exception on one line and the row's reason carries it
    from cebench import sweep

    class FakeWorker:
        def __init__(self, *args, **kwargs):
            pass

        def run(self, task, timeout):
            yield ("error", "Traceback ...\nRuntimeError: CUDA error: illegal access\nCompile with TORCH_USE_CUDA_DSA",
                   "RuntimeError: CUDA error: illegal access Compile with TORCH_USE_CUDA_DSA")

        def stop(self):
            pass

    monkeypatch.setattr(sweep, "Worker", FakeWorker)
    (tmp_path / "one.toml").write_text('name = "one"\ndevice = "cpu"\n[[sweep]]\nfamily = "logits"\nN = [4]\nV = [9]\n'
                                       'modes = ["forward"]\n')
    rows = []
    writer = type("W", (), {"write_row": lambda self, r: rows.append(r), "write_samples": lambda self, k, s: None,
                            "write_cell_time": lambda self, record: None})()
    sweep.run_suite(suites.load(str(tmp_path / "one.toml")), [impls["torch"]], "cpu", writer, "r",
                     log=lambda *a: None, isolate=True)
    reasons = {r["reason"] for r in rows if r.get("status") == "failed"}
    assert reasons and all("harness error: RuntimeError: CUDA error: illegal access" in r for r in reasons), reasons


def test_out_of_memory_in_the_checks_second_call_is_an_oom_row():
    """The second agreement call (at the timed upstream gradient) can run out of memory where the first did not:
    that is an `oom` row, which does not exclude the implementation as a failure would (cebench/report/trust.py)."""
    load_file(ROOT / "tests" / "plugins" / "oom.py")
    sys.modules["cebench_plugin_oom"]._calls["n"] = 0
    case = Case("logits", N=16, V=33)
    pristine, ref, grad_output = case_data(case, "cpu")
    rows = list(CellRunner(registry()["oom_second_call"], case, ("forward",), "cpu", PLAN, pristine, ref, grad_output,
                           lambda key, samples: None).rows())
    check = next(r for r in rows if r["metric"] == "agreement")
    assert check["status"] == "oom", check
    assert check["reason"].startswith("the second call (upstream 1) raised: OutOfMemoryError"), check["reason"]


def test_the_figures_are_the_worse_of_the_two_calls():
    """Both calls agree, the timed path (upstream 1) less accurately: the recorded figures are that path's."""
    load_file(ROOT / "tests" / "plugins" / "ones_path_less_accurate.py")
    case = Case("logits", N=64, V=257)
    pristine, ref, grad_output = case_data(case, "cpu")
    rows = list(CellRunner(registry()["ones_path_less_accurate"], case, ("forward",), "cpu", PLAN, pristine, ref,
                           grad_output, lambda key, samples: None).rows())
    by_metric = {r["metric"]: r for r in rows if r["mode"] == "check"}
    assert by_metric["agreement"]["status"] == "ok" and "a second call at upstream 1 agrees too" in \
        by_metric["agreement"]["reason"]
    assert by_metric["accuracy[logits]"]["value"] > 0.1, by_metric["accuracy[logits]"]  # the first call's: ~0.01
