"""scripts/tune_triton_fused.py, the parts that run without a GPU: its correctness gate and its choice.

The timing needs CUDA (do_bench, the probe); what decides which config the headline runs with does not:
a config whose loss disagrees with F.cross_entropy is out, one that failed at any vocabulary is out, and
the best is the highest geometric mean of the training fraction of the copy bandwidth.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tune(impls):
    spec = importlib.util.spec_from_file_location("tune_triton_fused", ROOT / "scripts" / "tune_triton_fused.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(**fractions):  # the time that fraction of a 1 GB/ms ceiling takes, as the script writes both
    return [{"config": name, "V": v, "mode": "forward+backward", "fraction": f, "ms": 1 / f}
            for name, by_v in fractions.items() for v, f in by_v.items()]


def test_the_best_config_per_vocabulary_is_the_fastest_in_training(tune):
    rows = _rows(balanced={32000: 0.9, 256000: 0.4}, deep={32000: 0.7, 256000: 0.6})
    rows += [{"config": "deep", "V": 32000, "mode": "eval", "fraction": 0.99, "ms": 0.5}]  # eval does not vote
    # a probe that failed leaves no fraction; the times still rank the configs
    assert tune.best_configs([{**r, "fraction": None} for r in rows]) == {32000: "balanced", 256000: "deep"}
    assert tune.best_configs(rows) == {32000: "balanced", 256000: "deep"}
    assert tune.config_table(tune.best_configs(rows)) == "32000:balanced,256000:deep"
    assert tune.config_table({32000: "deep", 256000: "deep"}) == "deep"  # one winner: its name alone
    assert tune.config_table({}) is None


def test_a_config_is_chosen_only_where_it_passed_the_gate(tune):
    rows = _rows(balanced={32000: 0.5, 256000: 0.5}, deep={32000: 0.9})
    rows.append({"config": "deep", "V": 256000, "error": "OutOfResources: shared memory"})
    assert tune.best_configs(rows) == {32000: "deep", 256000: "balanced"}
    assert tune.best_configs([{"config": "deep", "V": 1, "error": "x"}]) == {}


def test_the_printed_table_is_what_the_kernel_reads(tune, monkeypatch):
    # the tuner's output, exported as CEBENCH_TRITON_FUSED_CONFIG, picks per row width as documented
    fused = tune.load_kernel()
    monkeypatch.setenv(fused.CONFIG_ENV, tune.config_table({32000: "narrow", 128256: "wide", 256000: "deep"}))
    assert [fused.select_config(None, v).name for v in (1000, 32000, 50257, 151936, 300000)] == \
        ["narrow", "narrow", "wide", "deep", "deep"]
    assert fused.select_config("balanced", 50257).name == "balanced"  # the keyword wins
    # the loss-only launch takes its own table where the tuner printed one, else the training one
    assert fused.select_config(None, 50257, loss_only=True).name == "wide"
    monkeypatch.setenv(fused.EVAL_CONFIG_ENV, "50257:unbounded,256000:narrow")
    assert [fused.select_config(None, 50257, loss_only=loss_only).name for loss_only in (True, False)] == \
        ["unbounded", "wide"]


def test_the_gate_measures_the_kernel_against_float32_cross_entropy(tune):
    fused = tune.load_kernel()
    torch.manual_seed(0)
    logits = (torch.randn(16, 300) * 2).to(torch.bfloat16)
    targets = torch.randint(0, 300, (16,))
    before = logits.clone()
    loss_err, grad_err = tune.check(fused, fused.CANDIDATE_CONFIGS[0], logits, targets)
    assert loss_err < 1e-3 and grad_err < 1e-2
    assert torch.equal(logits, before)  # the gate works on a copy: the timed buffer is the pristine one


def test_the_gate_catches_a_config_that_computes_another_loss(tune, monkeypatch):
    fused = tune.load_kernel()
    real = fused.fused_ce_rows
    monkeypatch.setattr(fused, "fused_ce_rows", lambda *a, **k: tuple(t * 1.05 for t in real(*a, **k)))
    logits, targets = torch.randn(16, 300).to(torch.bfloat16), torch.randint(0, 300, (16,))
    loss_err, grad_err = tune.check(fused, fused.CANDIDATE_CONFIGS[0], logits, targets)
    assert loss_err == pytest.approx(0.05, rel=0.05) and grad_err < 1e-2


def test_the_gate_catches_a_config_that_writes_another_gradient(tune, monkeypatch):
    # a loss that is right over a gradient that is not (the second pass alone broken) is caught too
    fused = tune.load_kernel()
    real = fused.fused_ce_rows

    def half_a_gradient(x, targets, grad_out, *args, **kwargs):
        out = real(x, targets, grad_out, *args, **kwargs)
        grad_out[:, : x.shape[1] // 2] = 0
        return out

    monkeypatch.setattr(fused, "fused_ce_rows", half_a_gradient)
    logits, targets = torch.randn(16, 300).to(torch.bfloat16), torch.randint(0, 300, (16,))
    loss_err, grad_err = tune.check(fused, fused.CANDIDATE_CONFIGS[0], logits, targets)
    assert loss_err < 1e-3 and grad_err > 0.1


def test_configs_are_measured_in_order_until_the_deadline_and_the_best_is_named(tune, monkeypatch, tmp_path, capsys):
    # the whole script on the CPU: the interpreter runs the gate for real; the probe and the timer are fakes.
    # Each timing advances a fake clock by 10 s, so with a 25 s deadline the 4th config is never begun.
    from types import SimpleNamespace

    from cebench import probe
    fused = tune.load_kernel()
    names = [c.name for c in fused.CANDIDATE_CONFIGS]
    now = [0.0]
    monkeypatch.setattr(tune, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(probe, "run_probe", lambda device: {"copy_bandwidth_gbps": 100.0, "read_bandwidth_gbps": 100.0})

    def fake_time(fused_, config, logits, targets):
        now[0] += 10
        return {"forward+backward": 1.0 if config.name == names[1] else 2.0, "eval": 1.0}

    monkeypatch.setattr(tune, "time_config", fake_time)
    out = tmp_path / "tune.json"
    assert tune.main(["--device", "cpu", "--tokens", "16", "--vocab", "300", "--deadline-s", "25",
                      "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    measured = list(dict.fromkeys(r["config"] for r in table["rows"]))
    assert measured == names[:3]
    assert all(r["rel_err_loss"] < 1e-3 and r["rel_err_grad"] < 1e-2 for r in table["rows"])
    out = capsys.readouterr().out.splitlines()
    # printed after every config, so a run killed by a timeout still names its choice so far: the last counts
    assert [line for line in out if line.startswith("best: ")] == [f"best: {n}" for n in (names[0], names[1], names[1])]
    assert table["best"] == names[1] and out[-1] == f"deadline: {names[3]} and later configs not measured"
    assert [line for line in out if line.startswith("best eval:")][-1] == f"best eval: {names[0]}"  # ties: the first
