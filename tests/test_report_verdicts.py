"""Verdicts people can trust, on planted runs: who is never recommended, what noise does, what the report shows.

Each run is written in a temporary directory with the real RunWriter (results.csv, samples.jsonl,
env.json), with the columns and check rows of today's runner: eval mode, grad_in_forward,
upstream_grad, distribution, model, accuracy[q] / row_accuracy[q] / bias[q] and eval_agreement.
Every test holds its own control: the same run without the plant recommends the planted
implementation (or does not mark it), so a test fails if the rule it checks stops working.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from cebench import conformance
from cebench.report import data as report_data
from cebench.report import trust as report_trust
from cebench.report.accuracy import LOOSE_ABOVE
from cebench.report.verdicts import recommendations, verdicts
from cebench.report.write import write_reports
from cebench.results import RunWriter, environment, write_env

MODES = ("forward", "backward", "forward+backward", "eval")
ENV = {"time": "2026-01-02T03:04:05+00:00", "device": "cpu", "device_name": "Test CPU", "torch": "9.9.9-test",
       "triton": "0.0-test", "git_commit": "c0ffee", "suite": "planted", "argv": ["python", "-m", "cebench", "run"]}
STEADY = (0.99, 0.995, 1.0, 1.005, 1.01)  # p80/p20 ≈ 1.01: quiet


def case_id(family, N, V, H, dtype, distribution="gaussian", model=None) -> str:
    parts = [family, f"N={N}", f"V={V}", *([f"H={H}"] if H else []), dtype, "mean"]
    parts += [f"dist={distribution}"] if distribution != "gaussian" else []
    parts += [f"model={model}"] if model else []
    return " ".join(parts)


def cell(writer: RunWriter, impl: str, ms: float, *, family="logits", N=64, V=1000, H=None, dtype="float32",
         mib=1.0, agrees=True, eval_agrees=True, accuracy=1.0, grad_in_forward=False, spread=STEADY,
         distribution="gaussian", model=None, upstream="ones", bias=0.1, bias_t=0.5) -> str:
    """One implementation × case: check rows (accuracy figures, agreement, eval agreement), then every mode."""
    case = case_id(family, N, V, H, dtype, distribution, model)
    base = {"run_id": "planted", "suite": "planted", "case": case, "family": family, "impl": impl, "N": N, "V": V,
            "H": H, "dtype": dtype, "reduction": "mean", "ignore_frac": 0.0, "label_smoothing": 0.0, "z_loss": 0.0,
            "device": "cpu", "mutates_inputs": False, "grad_in_forward": grad_in_forward, "upstream_grad": upstream,
            "distribution": distribution, "model": model}
    trusted = agrees and eval_agrees

    def row(mode, metric, value=None, status="ok", **extra):
        writer.write_row({**base, "mode": mode, "metric": metric, "value": value, "status": status,
                          "trusted": trusted and status == "ok", **extra})

    grads = ["hidden", "weight"] if family == "linear" else ["logits"]
    row("check", "accuracy[loss]", 0.5, unit="x best", reason="loss: 0.5 half-ulps <= 2")
    for q in grads:
        row("check", f"rel_err[{q}]", 1e-3 * accuracy, unit="rel")
        row("check", f"max_abs_err[{q}]", 1e-5 * accuracy, unit="abs")
        row("check", f"accuracy[{q}]", accuracy, unit="x best", reason=f"{q}: accuracy {accuracy}x")
        row("check", f"row_accuracy[{q}]", accuracy * 1.5, unit="x best", reason="worst row 3")
        row("check", f"col_accuracy[{q}]", accuracy * 2, unit="x best", reason="worst column 7")
        row("check", f"bias[{q}]", bias, unit="half-ulps", reason=f"t = {bias_t}")
    row("check", "agreement", float(agrees), "ok" if agrees else "failed", unit="bool",
        reason="agrees: fine" if agrees else "DISAGREES with float64 reference: logits: accuracy 40x > 8x")
    row("check", "mutates_input", 0.0, unit="bool")
    row("check", "eval_agreement", float(eval_agrees), "ok" if eval_agrees else "failed", unit="bool",
        reason="eval agrees" if eval_agrees else "eval wrote into its inputs under no_grad (mutated: logits)")
    for k, mode in enumerate(MODES):
        scale = ms * (1 + k)
        samples = sorted(scale * f for f in spread)
        p20, p80 = statistics.quantiles(samples, n=5)[0], statistics.quantiles(samples, n=5)[3]
        row(mode, "peak_memory", mib * (1 + k), unit="MiB")
        row(mode, "time", statistics.median(samples), p20=p20, p80=p80, n=len(samples), unit="ms")
        writer.write_samples({"impl": impl, "case": case, "mode": mode}, samples)
    return case


def finish(writer: RunWriter, run_dir: Path, env: dict | None = None) -> Path:
    writer.close()
    write_env(run_dir, {**ENV, **(env or {})})
    return run_dir


def named(frame, trust=None) -> set[str]:
    """Every implementation any verdict names: per case (fastest, leanest) and per range (use, leanest, eval)."""
    names = set()
    for v in verdicts(frame, trust):
        names |= {p["impl"] for p in (v["fastest"], v["leanest"]) if p}
    for r in recommendations(frame, trust):
        names |= {p["impl"] for p in (r["fastest"], r["leanest"], r["eval"]) if p}
    return names


def plant_run(tmp_path: Path, name: str, *, fast_agrees_elsewhere=True, fast_eval_agrees=True) -> Path:
    """`fast` is the fastest and leanest everywhere; it agrees at V=1000 and, unless planted, at V=3000 too."""
    writer = RunWriter(tmp_path / name)
    for V in (1000, 3000):
        cell(writer, "fast", 0.5, V=V, mib=0.5, agrees=fast_agrees_elsewhere or V == 1000,
             eval_agrees=fast_eval_agrees or V == 1000)
        cell(writer, "torch", 1.0, V=V)
    cell(writer, "fast", 0.5, V=1000, dtype="bfloat16", mib=0.5)  # agrees in bf16: may be named there
    cell(writer, "torch", 1.0, V=1000, dtype="bfloat16")
    return finish(writer, tmp_path / name)


# ---------------------------------------------------------------- the run's own checks


def test_an_implementation_that_disagreed_in_the_run_is_never_recommended(tmp_path):
    control = report_data.load(plant_run(tmp_path, "control"), [])
    assert "fast" in named(control.frame, control.trust)  # without the plant it wins everything

    run = report_data.load(plant_run(tmp_path, "planted", fast_agrees_elsewhere=False), [])
    fp32 = run.frame[run.frame["dtype"] == "float32"]
    assert "fast" not in named(fp32, run.trust)  # not even at V=1000, where it agreed
    bf16 = [v for v in verdicts(run.frame, run.trust) if "bfloat16" in v["case"]]
    assert {v["fastest"]["impl"] for v in bf16} == {"fast"}  # another dtype: it agreed there, it may win
    text = write_reports(run.run_dir, tmp_path / "reports", [])["markdown"].read_text()
    assert "Never recommended here" in text and "logits float32: `fast`: in this run: failed the check" in text
    assert "fast ⊘" in text


def test_an_implementation_that_failed_the_evaluation_check_is_never_recommended(tmp_path):
    run = report_data.load(plant_run(tmp_path, "planted", fast_eval_agrees=False), [])
    fp32 = run.frame[run.frame["dtype"] == "float32"]
    assert "fast" not in named(fp32, run.trust)
    assert any("failed the evaluation check" in why for _, reasons in run.trust.reasons("logits", "float32")
               for why in reasons)


# ---------------------------------------------------------------- the stored conformance matrix


def store_table(folder: Path, rows: list[dict], env: dict) -> Path:
    folder.mkdir(parents=True)
    with open(folder / "conformance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=conformance.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (folder / "versions.json").write_text(json.dumps(env))
    return folder


def conf_row(impl: str, scenario: str, status: str = "agrees") -> dict:
    return {"impl": impl, "family": "logits", "scenario": scenario, "status": status, "detail": "planted"}


def conformance_rows(fast_status: str, scenario: str = "huge fp32") -> list[dict]:
    rows = [conf_row(i, s) for i in ("fast", "torch") for s in ("all ignored", "N=0 mean", "huge fp32", "huge bf16")
            if (i, s) != ("fast", scenario)]
    return rows + [conf_row("fast", scenario, fast_status)]


def test_an_implementation_that_fails_the_stored_conformance_table_is_never_recommended(tmp_path):
    run_dir = plant_run(tmp_path, "run")
    store = tmp_path / "conformance"
    store_table(store / "20260101-000000-cpu", conformance_rows("agrees"), {**ENV, "git_commit": "older"})
    control = report_data.load(run_dir, [store])
    assert control.trust.table is not None and "fast" in named(control.frame, control.trust)

    store_table(store / "20260102-000000-cpu", conformance_rows("differs"), ENV)  # newer, same versions: it counts
    run = report_data.load(run_dir, [store])
    assert "fast" not in named(run.frame, run.trust)  # a float32 scenario speaks for every dtype
    text = write_reports(run_dir, tmp_path / "reports", [store])["markdown"].read_text()
    assert "conformance table 20260102-000000-cpu" in text and "conformance: huge fp32: differs" in text
    assert "Not checked against the conformance matrix" not in text


def test_a_failing_scenario_counts_only_where_it_applies(tmp_path):
    run_dir = plant_run(tmp_path, "run")
    store = tmp_path / "conformance"
    store_table(store / "20260102-000000-cpu", conformance_rows("differs", "huge bf16"), ENV)
    run = report_data.load(run_dir, [store])
    assert "fast" not in named(run.frame[run.frame["dtype"] == "bfloat16"], run.trust)
    assert "fast" in named(run.frame[run.frame["dtype"] == "float32"], run.trust)  # bf16 scenario, fp32 cases

    use = report_trust.Usage("float32", frozenset({"mean"}), frozenset())
    assert report_trust.scenario_applies("N=0 mean", use) and report_trust.scenario_applies("-inf logits", use)
    assert not report_trust.scenario_applies("int32 targets", use)  # the run passes int64 targets
    assert not report_trust.scenario_applies("label smoothing 1.0", use)  # an option the run does not use
    assert report_trust.scenario_applies("label smoothing 1.0", report_trust.Usage(
        "float32", frozenset({"mean"}), frozenset({"label_smoothing"})))
    assert not report_trust.scenario_applies("N=0 none", use) and not report_trust.scenario_applies("backward twice", use)
    assert report_trust.scenario_applies("autocast bf16", report_trust.Usage("autocast-bfloat16", frozenset({"mean"}),
                                                                             frozenset()))
    assert report_trust.scenario_applies("targets at shard edges · 2 ranks, V=512 (even)", use)
    assert report_trust.scenario_applies("a scenario from a newer table", use)  # unknown: the safe side


def test_a_table_for_other_versions_is_not_used_and_the_report_says_so(tmp_path):
    run_dir = plant_run(tmp_path, "run")
    store = tmp_path / "conformance"
    store_table(store / "20260102-000000-cpu", conformance_rows("differs"), {**ENV, "torch": "1.0-other"})
    store_table(store / "20260103-000000-cuda", conformance_rows("differs"), {**ENV, "device": "cuda:0"})
    run = report_data.load(run_dir, [store])
    assert run.trust.table is None and "torch '1.0-other'" in run.trust.note and "device 'cuda:0'" in run.trust.note
    text = write_reports(run_dir, tmp_path / "reports", [store])["markdown"].read_text()
    assert "**⚠ Not checked against the conformance matrix: no conformance table matches" in text
    html = (tmp_path / "reports" / "run" / "report.html").read_text()
    assert "Not checked against the conformance matrix" in html


def test_conformance_write_records_the_versions_a_report_matches(tmp_path):
    path = conformance.write([conf_row("fast", "huge fp32", "differs")], "cpu", tmp_path / "table")
    versions = json.loads((path.parent / "versions.json").read_text())
    env = environment("cpu", "planted", "")
    assert report_trust.find_conformance(env, [tmp_path])[0] is not None
    versions["torch"] = "0.0-other"
    (path.parent / "versions.json").write_text(json.dumps(versions))
    assert report_trust.find_conformance(env, [tmp_path])[0] is None


# ---------------------------------------------------------------- noise


def noise_run(tmp_path: Path, runner_ms: float, spread=STEADY) -> Path:
    writer = RunWriter(tmp_path / f"noise-{runner_ms}")
    cell(writer, "winner", 1.0, spread=spread)
    cell(writer, "runner", runner_ms)
    return finish(writer, tmp_path / f"noise-{runner_ms}")


def test_a_fastest_within_the_noise_says_so(tmp_path):
    def fastest(run_dir):
        run = report_data.load(run_dir, [])
        return next(v for v in verdicts(run.frame, run.trust) if v["mode"] == "forward")["fastest"]

    apart = fastest(noise_run(tmp_path, 1.5))  # runner-up 50 % slower, 5 quiet samples each: told apart
    assert apart["impl"] == "winner" and not apart["within_noise"] and apart["runner_up"] == "runner"
    close = fastest(noise_run(tmp_path, 1.001))  # 0.1 % slower: samples interleave
    assert close["impl"] == "winner" and close["within_noise"]
    text = write_reports(tmp_path / "noise-1.001", tmp_path / "reports", [])["markdown"].read_text()
    assert "within the noise of `runner`" in text and "**within the noise** in every case" in text


def test_a_wide_spread_marks_the_cell_noisy(tmp_path):
    assert report_trust.NOISE_SPREAD == pytest.approx(1.10)
    wide = (0.8, 0.9, 1.0, 1.1, 1.2)  # p80/p20 ≈ 1.3
    run = report_data.load(noise_run(tmp_path, 1.5, wide), [])
    cells = {c[1].text: c for c in report_data.time_table(run.frame, "logits").rows}
    assert all("noisy" in c.text for c in cells["winner"][2:])
    assert not any("noisy" in c.text for c in cells["runner"][2:])  # the quiet one is not marked
    pick = next(v for v in verdicts(run.frame, run.trust) if v["mode"] == "forward")["fastest"]
    assert pick["noisy"] and pick["spread"] > report_trust.NOISE_SPREAD


# ---------------------------------------------------------------- what the report shows


@pytest.fixture(scope="module")
def shown(tmp_path_factory) -> dict:
    parent = tmp_path_factory.mktemp("shown")
    writer = RunWriter(parent / "shown")
    cell(writer, "fused", 1.0, grad_in_forward=True)
    cell(writer, "plain", 0.8)
    cell(writer, "loose_impl", 0.9, accuracy=LOOSE_ABOVE + 0.5)
    cell(writer, "linear_torch", 2.0, family="linear", H=4096, V=128256, N=64, dtype="bfloat16", model="llama3-8b")
    cell(writer, "linear_torch", 2.0, family="linear", H=4096, V=128256, N=64, dtype="bfloat16", model="llama3-8b",
         distribution="lm")
    cell(writer, "torch", 1.0, dtype="autocast-bfloat16")
    cell(writer, "broken", 0.1, family="linear", H=4096, V=128256, N=64, dtype="bfloat16", model="llama3-8b",
         agrees=False)
    run_dir = finish(writer, parent / "shown")
    paths = write_reports(run_dir, parent / "reports", [])
    return {"run": report_data.load(run_dir, []), "md": paths["markdown"].read_text(), "html": paths["html"].read_text()}


def _row(table, impl: str, case_part: str = ""):
    return next(r for r in table.rows if r[1].text.startswith(impl) and case_part in r[0].text)


def test_forward_times_say_when_they_hold_the_gradient(shown):
    table = report_data.time_table(shown["run"].frame, "logits")
    assert table.columns[2:] == ["forward", "backward", "forward+backward", "eval (loss only)"]
    fused, plain = _row(table, "fused"), _row(table, "plain")
    assert fused[2].text.endswith("fwd+grad") and "fwd+grad" not in plain[2].text
    assert not any("fwd+grad" in c.text for c in fused[3:])  # only the forward holds it
    assert "fwd+grad: this implementation's training forward also computes the gradient" in shown["md"]
    assert "Forward times marked fwd+grad (`fused`)" in shown["md"] and "fwd+grad (fused)" in shown["html"]
    assert "Upstream gradient of the timed backward: ones" in shown["md"]


def test_eval_is_shown_as_the_loss_only_comparison(shown):
    run = shown["run"]
    memory = report_data.memory_table(run.frame, "logits")
    assert memory.columns[-1] == "eval (loss only)"
    # eval's floor is the forward's (one float32 per row): 1 MiB × 4 ÷ (64 × 4 bytes)
    assert _row(memory, "plain")[-1].text == "4.000 (16384× floor)"
    assert "| use (fastest, forward+backward) | leanest | fastest for evaluation (loss only) |" in shown["md"]
    recs = [r for r in recommendations(run.frame, run.trust) if r["family"] == "logits" and r["dtype"] == "float32"]
    assert recs[0]["eval"]["impl"] == "plain"
    assert "| eval (loss only) |" in shown["md"]  # per-case verdicts too


def test_accuracy_figure_and_loose_marking(shown):
    from cebench.report.accuracy import accuracy_table

    table = accuracy_table(shown["run"].frame, "logits")
    assert table.columns[2:5] == ["check", "eval check", "accuracy (worst; 1 = the dtype's best)"]
    plain, loose = _row(table, "plain"), _row(table, "loose_impl")
    assert plain[2].text == "pass" and plain[4].text == "1× (logits)"  # its worst row (1.5×) is not the figure
    assert loose[2].text == "loose" and loose[4].status == "loose" and loose[4].text.startswith("1.6×")
    assert "1 = as accurate as the dtype allows" in shown["md"] and "*loose*" in shown["md"]
    assert "| loose |" in shown["md"]


def test_worst_figures_per_implementation_and_dtype(tmp_path):
    from cebench.report.accuracy import worst_table

    writer = RunWriter(tmp_path / "worst")
    cell(writer, "plain", 1.0, V=1000, accuracy=1.2, bias=-0.3, bias_t=-1.0)
    cell(writer, "plain", 1.0, V=2000, accuracy=3.0, bias=-1.5, bias_t=-9.0)  # significant: shown though smaller
    cell(writer, "plain", 1.0, V=3000, accuracy=0.5, bias=4.0, bias_t=2.0)  # larger, noise
    cell(writer, "plain", 1.0, V=2000, dtype="bfloat16")
    cell(writer, "broken", 1.0, V=1000, agrees=False, accuracy=40.0)
    cell(writer, "broken", 1.0, V=2000)
    run = report_data.load(finish(writer, tmp_path / "worst"), [])
    table = worst_table(run.frame, "logits")
    rows = {(r[0].text, r[1].text): r[2:] for r in table.rows}
    assert list(rows) == [("plain", "float32"), ("plain", "bfloat16"), ("broken", "float32")]
    plain = [c.text for c in rows[("plain", "float32")]]
    assert plain == ["3 of 3", "3×", "4.5×", "6×", "1.5", "—", "0.5 half-ulps"]
    assert [c.text for c in rows[("plain", "bfloat16")]][:2] == ["1 of 1", "1×"]
    assert [c.text for c in rows[("broken", "float32")]][:2] == ["1 of 2", "40×"]
    assert rows[("broken", "float32")][0].status == "fail"
    quiet = [c.text for c in rows[("plain", "bfloat16")]][4]
    assert quiet == "0.1*"  # no significant bias: the largest, marked
    line = rows[("plain", "float32")][1].line  # every figure traces back to its results.csv row
    source = run.frame[run.frame["line"] == line].iloc[0]
    assert source["metric"] == "accuracy[logits]" and source["value"] == 3.0
    text = write_reports(tmp_path / "worst", tmp_path / "reports", [])["markdown"].read_text()
    assert "| gradients: accuracy | worst row | worst column | \\|bias\\| (half-ulps) |" in text  # pipes escaped


def test_no_worst_figures_for_a_run_of_one_case_each(tmp_path):
    from cebench.report.accuracy import worst_table

    writer = RunWriter(tmp_path / "single")
    cell(writer, "plain", 1.0)
    cell(writer, "other", 1.0, dtype="bfloat16")
    assert worst_table(report_data.load(finish(writer, tmp_path / "single"), []).frame, "logits") is None


def test_model_and_distribution_and_autocast_shown_with_the_case(shown):
    md = shown["md"]
    assert "N=64 V=128256 H=4096 (llama3-8b) bfloat16 mean dist=gaussian" in md  # the distribution varies here
    assert "N=64 V=128256 H=4096 (llama3-8b) bfloat16 mean dist=lm" in md
    assert "model=" not in md and "model=" not in shown["html"]  # never the raw case id: tables, verdicts, failures
    assert "`broken` on linear N=64 V=128256 H=4096 (llama3-8b) bfloat16 mean dist=gaussian" in md  # failures
    assert "<td>N=64 V=128256 H=4096 (llama3-8b) bfloat16 mean dist=lm</td>" in shown["html"]  # rows plotted
    assert "autocast-bfloat16" in md
    assert "| models |" in md and "| llama3-8b |" in md
    assert "| inputs |" in md and "| lm |" in md


def test_a_run_without_the_new_columns_renders(tmp_path):
    """Runs from before eval mode, grad_in_forward, upstream_grad, distribution, model and the accuracy rows."""
    new = plant_run(tmp_path, "new")
    old = tmp_path / "old"
    old.mkdir()
    dropped = {"grad_in_forward", "upstream_grad", "distribution", "model"}
    with open(new / "results.csv", newline="") as src, open(old / "results.csv", "w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, [c for c in reader.fieldnames if c not in dropped], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r for r in reader if r["mode"] != "eval" and "accuracy[" not in r["metric"]
                         and r["metric"] != "eval_agreement")
    (old / "env.json").write_text((new / "env.json").read_text())
    text = write_reports(old, tmp_path / "reports", [])["markdown"].read_text()
    assert "Upstream gradient of the timed backward: not recorded in this run." in text
    assert "This run predates the accuracy figures" in text and "eval (loss only)" not in text


def test_odd_cells_and_an_empty_run_render(tmp_path):
    """Text where a flag belongs, a number where a name belongs, a broken samples file, a run with no rows."""
    run_dir = plant_run(tmp_path, "odd")
    with open(run_dir / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    for i, row in enumerate(rows):
        row.update({0: {"grad_in_forward": "maybe"}, 1: {"upstream_grad": "42", "model": "nan"},
                    2: {"distribution": "", "p20": "abc"}, 3: {"value": "-inf", "p80": "inf"}}[i % 4])
    with open(run_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "samples.jsonl").write_text('{"impl": "fast", "samples_ms": [NaN]}\nnot json\n')
    assert "## Verdict" in write_reports(run_dir, tmp_path / "reports", [])["markdown"].read_text()

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "results.csv").write_text(",".join(fields) + "\n")
    (empty / "env.json").write_text(json.dumps(ENV))
    text = write_reports(empty, tmp_path / "reports", [])["markdown"].read_text()
    assert "## Verdict" in text and "looked in: no folder given" in text


COMMITTED = sorted(p for p in (Path(__file__).resolve().parent.parent / "results").glob("2*") if
                   (p / "results.csv").is_file())


@pytest.mark.parametrize("run_dir", COMMITTED, ids=[p.name for p in COMMITTED])
def test_committed_runs_render(run_dir):
    from cebench.report.html import html
    from cebench.report.md import markdown

    run = report_data.load(run_dir)
    assert "## Verdict" in markdown(run, {}) and "<html" in html(run, {})


def test_reports_look_for_the_conformance_table_where_conformance_writes_it():
    # one directory, named twice (a report never imports the conformance runner): the same, and in the repository
    assert report_trust.CONFORMANCE_DIR == conformance.REPORTS_DIR
    assert report_trust.CONFORMANCE_DIR.is_dir() and any(report_trust.CONFORMANCE_DIR.glob("*/conformance.csv"))
