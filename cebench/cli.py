"""Command line: `python -m cebench run | list | report | compare | conformance | estimate | train-check`.

Exit codes: 0 all good; 1 an implementation failed, crashed, ran out of memory or time,
disagreed with the reference or broke its declaration (e.g. mutated its inputs), or for
`conformance` a cell differs or errors: the run still finishes and keeps every other
result; 2 bad arguments, suite file or input (the message names what is wrong), before
any implementation runs.

`run` isolates every implementation in a worker process of its own (cebench.isolate), with a
per-case time limit (--timeout); `run --resume RUN_DIR` finishes an interrupted run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from cebench import conformance, distributed, estimate, models, registry, resume, suites
from cebench.cases import CaseError
from cebench.probe import run_probe
from cebench.report.write import write_reports
from cebench.results import REPO, RunWriter, environment, new_run_id, write_env
from cebench.sweep import run_suite, stderr_log

EXIT_OK, EXIT_IMPL_FAILED, EXIT_USAGE = 0, 1, 2
# seconds one implementation may spend on one case: on a GPU a cell of the shipped suites takes seconds,
# so a cell still running after 3 minutes is stuck and would eat a short GPU slot; the CPU is far slower
DEFAULT_TIMEOUT_S = {"cpu": 600.0, "cuda": 180.0}


def default_timeout(device: str) -> float:
    return DEFAULT_TIMEOUT_S[device.split(":")[0]]
RESULTS_DIR = REPO / "results"


class UsageError(Exception):
    pass


def detect_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _split(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _load_impls(plugins: list[str]) -> None:
    # Without a GPU, Triton kernels can only run in the interpreter, which must be switched
    # on before any kernel is defined (i.e. before the implementation files are imported).
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    registry.load_all(plugins)
    for source, error in registry.LOAD_ERRORS.items():
        stderr_log(f"warning: plugin {source} failed to import and is skipped: {error}")


def _check_device(device: str) -> str:
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but torch sees no CUDA device")
    return device


def _recorded_args(args) -> tuple[Path, dict]:
    """--resume RUN_DIR: the run directory and the arguments it was started with (none may be given again)."""
    given = [f"--{k.replace('_', '-')}" for k in ("suite", "impl", "device", "out", "model", "tokens") if getattr(args, k)]
    given += ["--timeout"] * (args.timeout is not None) + ["--nproc"] * (args.nproc != 1)
    given += ["--plugin"] * bool(args.plugin) + ["--no-isolate"] * bool(args.no_isolate)
    if given:
        raise UsageError(f"--resume takes the run's arguments from its env.json; do not give {given}")
    run_dir = Path(args.resume)
    try:
        env = resume.run_args(run_dir)
    except resume.ResumeError as exc:
        raise UsageError(str(exc)) from exc
    return run_dir, env


def _relocate_recorded(args) -> None:
    """A resumed run's suite and plugin files, found in this checkout where it was started in another one."""
    bases = [Path.cwd(), Path(__file__).resolve().parent.parent]
    for attr, paths in (("suite", [args.suite]), ("plugin", args.plugin)):
        moved = [resume.relocate(p, bases) if p else p for p in paths]
        for old, new in zip(paths, moved, strict=True):
            if old != new:
                stderr_log(f"cebench: --resume: {old} is not here; using {new}")
        setattr(args, attr, moved[0] if attr == "suite" else moved)


def cmd_run(args) -> int:
    env = None
    if args.resume:
        run_dir, env = _recorded_args(args)
        recorded = env["run_args"]
        args.suite, args.impl, args.plugin = recorded["suite"], recorded["impl"], list(recorded["plugin"])
        _relocate_recorded(args)
        args.device, args.timeout, args.no_isolate = recorded["device"], recorded["timeout"], not recorded["isolate"]
        args.nproc = recorded.get("nproc", 1)
        args.model, args.tokens = recorded.get("model"), recorded.get("tokens")
        args.suite = None if args.model else args.suite  # a preset run is rebuilt from its models, not a file
    device = _check_device(args.device or detect_device())
    if args.timeout is None:
        args.timeout = default_timeout(device)
    suite = _model_suite(args) or suites.load(args.suite or suites.DEFAULT_SUITE[device.split(":")[0]])
    _load_impls(args.plugin)
    impls = registry.select(_split(args.impl))
    done: set = set()
    if env is not None:
        if env.get("suite_hash") != suite.sha256:
            raise UsageError(f"{suite.path} changed since run {run_dir} started; start a new run instead of resuming")
        run_id = run_dir.name
        done = resume.finished_cells(run_dir, [(c, m, i) for c, m, r in distributed.resolved_cells(suite, args.nproc)
                                               for i in impls
                                               if i.family == c.family and (r is None or i.name in r)])
        env.setdefault("resumed", []).append(environment(device, suite.name, suite.sha256)["time"])
    else:
        run_id = new_run_id(suite.name, device)
        run_dir = Path(args.out or RESULTS_DIR) / run_id
        env = environment(device, suite.name, suite.sha256, [sys.executable, "-m", "cebench", *sys.argv[1:]])
        env.update(run_probe(device) or {})  # the report's rooflines; nothing on the CPU
        # what --resume needs to finish this run exactly as it was started
        plugins = [str(Path(p).resolve()) if Path(p).is_file() else p for p in args.plugin]
        env["run_args"] = {"suite": str(suite.path.resolve()), "impl": args.impl, "plugin": plugins, "device": device,
                           "timeout": args.timeout, "isolate": not args.no_isolate, "nproc": args.nproc,
                           "model": args.model, "tokens": args.tokens}
        if args.model:  # which model each (V, H) of the run is (the rows carry it too, in their model column)
            env["models"] = {f"V={v} H={h}": name for (v, h), name in
                             models.labels(models.resolve(_split(args.model))).items()}
    # vocab-parallel cases at world size > 1 go to torchrun; one the sharding cannot serve is a usage
    # error (exit 2) here, before the run directory exists or anything is launched
    split = distributed.plan(suite, args.nproc)
    writer = RunWriter(run_dir)
    write_env(run_dir, env)
    stderr_log(f"cebench: suite {suite.name} ({suite.path}) on {device}, {len(impls)} implementation(s) -> {run_dir}")
    try:
        outcome = run_suite(split.local, impls, device, distributed.WorldSizeOne(writer), run_id, log=stderr_log,
                            isolate=not args.no_isolate,
                            plugins=args.plugin, timeout=args.timeout or None, done=done, log_dir=run_dir / "logs")
        distributed.run_launches(split, impls, device, writer, run_id, run_dir, args.plugin, outcome, stderr_log,
                                 done=done)
    finally:
        writer.close()
    if not args.no_report:
        reports = write_reports(run_dir, args.reports_dir)
        stderr_log(f"cebench: results {run_dir / 'results.csv'}; report {reports['html']} (and report.md)")
    for problem in outcome.disagreed + outcome.failed:
        stderr_log(f"cebench: PROBLEM: {problem}")
    print(run_dir)
    return EXIT_IMPL_FAILED if outcome.disagreed or outcome.failed else EXIT_OK


def _model_suite(args):
    """--model NAMES --tokens N,...: a suite built from the model presets (cebench.models), else None."""
    if args.tokens and not args.model:
        raise UsageError("--tokens goes with --model (a suite file gives its own token counts)")
    if not args.model:
        return None
    if args.suite:
        raise UsageError("give either --suite or --model, not both")
    if not args.tokens:
        raise UsageError("--model needs --tokens N[,N...] (tokens per step), e.g. --tokens 8192,16384")
    try:
        tokens = [int(t) for t in _split(args.tokens) or []]
    except ValueError as exc:
        raise UsageError(f"--tokens needs comma-separated positive integers, got {args.tokens!r}") from exc
    return models.suite(_split(args.model) or [], tokens)


def cmd_list(args) -> int:
    if args.models:
        print(models.table())
        return EXIT_OK
    _load_impls(args.plugin)
    print(f"{'name':<22} {'family':<8} {'available':<10} {'mutates':<8} options / devices / dtypes")
    for impl in sorted(registry.registry().values(), key=lambda i: (i.family, i.name)):
        reason = impl.unavailable_reason()
        status = "yes" if reason is None else "no"
        print(f"{impl.name:<22} {impl.family:<8} {status:<10} {str(impl.mutates_inputs).lower():<8} "
              f"{impl.options_summary()} / {','.join(impl.devices)} / {','.join(impl.dtypes)}")
        if reason:
            print(f"{'':<22} unavailable: {reason}")
    for source, error in registry.LOAD_ERRORS.items():
        print(f"failed to load {source}: {error}")
    print(f"suites: {', '.join(suites.available_suites())}")
    return EXIT_OK


def cmd_report(args) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "results.csv").is_file():
        raise UsageError(f"{run_dir}: not a run directory (no results.csv)")
    for path in write_reports(run_dir, args.reports_dir).values():
        print(path)
    return EXIT_OK


def cmd_compare(args) -> int:
    for run_dir in (args.run_a, args.run_b):
        if not (Path(run_dir) / "results.csv").is_file():
            raise UsageError(f"{run_dir}: not a run directory (no results.csv)")
    from cebench.compare import compare as compare_runs  # scipy: imported only by the command that needs it
    from cebench.compare import markdown as compare_markdown

    result = compare_runs(args.run_a, args.run_b)
    text = compare_markdown(result, args.fail_on_regression)
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    if args.fail_on_regression is not None and len(result.regressions(args.fail_on_regression)):
        return EXIT_IMPL_FAILED
    return EXIT_OK


def cmd_conformance(args) -> int:
    device = _check_device(args.device or detect_device())
    _load_impls(args.plugin)
    impls = registry.select(_split(args.impl))
    rows = conformance.run(impls, device, args.plugin, timeout=args.timeout or None, isolate=not args.no_isolate,
                           log=stderr_log)
    path = conformance.write(rows, device, args.out)
    print(path.read_text(), end="")
    stderr_log(f"cebench: conformance table {path} (and conformance.csv)")
    return EXIT_IMPL_FAILED if any(r["status"] in ("differs", "error") for r in rows) else EXIT_OK


def cmd_train_check(args) -> int:
    from cebench import train_check  # matplotlib and the training model: only for this command

    device = _check_device(args.device or detect_device())
    _load_impls(args.plugin)
    try:
        return train_check.command(args, registry.select(_split(args.impl)), device, log=stderr_log)
    except ValueError as exc:  # bad sizes (CaseError, a bad --dtype, is reported by main)
        if isinstance(exc, CaseError):
            raise
        raise UsageError(str(exc)) from exc


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cebench", description="Benchmark cross-entropy implementations.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a suite and write results and a report")
    run.add_argument("--suite", help="suite name in suites/ or path to a .toml file (default: fits the device)")
    run.add_argument("--impl", help="comma-separated implementation names (default: all)")
    run.add_argument("--model", help="comma-separated model presets instead of a suite (list --models), e.g. qwen3-8b")
    run.add_argument("--tokens", help="with --model: comma-separated tokens per step (N), e.g. 8192,16384")
    run.add_argument("--plugin", action="append", default=[], help="plugin .py file or module name (repeatable)")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    run.add_argument("--out", help="directory to create the run directory in (default: results/)")
    run.add_argument("--nproc", type=_positive_int, default=1, metavar="K",
                     help="ranks for the vocab-parallel cases (torch.distributed.run; gloo on CPU, NCCL on GPU); "
                          "a suite's world_size values above K are skipped (default 1)")
    run.add_argument("--timeout", type=float,
                     help=f"seconds one implementation may spend on one case before it is killed and recorded as "
                          f"timeout (default {DEFAULT_TIMEOUT_S['cuda']:g} on a GPU, {DEFAULT_TIMEOUT_S['cpu']:g} on "
                          f"the CPU; 0: no limit; needs isolation)")
    run.add_argument("--no-isolate", action="store_true",
                     help="run implementations in this process (debugging: a crash then ends the run)")
    run.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run, skipping its finished cells")
    run.add_argument("--reports-dir", help="where reports go (default: reports/ for runs in results/, else beside the run)")
    run.add_argument("--no-report", action="store_true", help="write results only, no report")
    run.set_defaults(func=cmd_run)
    lst = sub.add_parser("list", help="list implementations, their availability and options")
    lst.add_argument("--plugin", action="append", default=[], help="plugin .py file or module name (repeatable)")
    lst.add_argument("--models", action="store_true", help="print the model presets (V, H, softcap, source) instead")
    lst.set_defaults(func=cmd_list)
    rep = sub.add_parser("report", help="write the Markdown and HTML reports of a run directory, and the index")
    rep.add_argument("run_dir")
    rep.add_argument("--reports-dir", help="where reports go (default: reports/ for runs in results/, else beside the run)")
    rep.set_defaults(func=cmd_report)
    cmp = sub.add_parser("compare", help="compare two runs case by case (Markdown on stdout)")
    cmp.add_argument("run_a", help="baseline run directory")
    cmp.add_argument("run_b", help="candidate run directory")
    cmp.add_argument("--fail-on-regression", type=float, metavar="PCT",
                     help="exit 1 if any case is significantly slower in RUN_B by more than PCT percent")
    cmp.add_argument("--out", help="also write the Markdown to this file")
    cmp.set_defaults(func=cmd_compare)
    est = sub.add_parser("estimate", help="how long a suite would take on a GPU (a model, before spending GPU time)")
    estimate.add_arguments(est)
    est.set_defaults(func=estimate.report)
    con = sub.add_parser("conformance", help="edge-case matrix for every implementation (Markdown on stdout)")
    con.add_argument("--impl", help="comma-separated implementation names (default: all)")
    con.add_argument("--plugin", action="append", default=[], help="plugin .py file or module name (repeatable)")
    con.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    con.add_argument("--timeout", type=float, default=120.0, help="seconds per cell before the worker is killed")
    con.add_argument("--no-isolate", action="store_true", help="run in this process (debugging)")
    con.add_argument("--out", help="folder for conformance.md/.csv (default: reports/conformance/<time>-<device>/)")
    con.set_defaults(func=cmd_conformance)
    tc = sub.add_parser("train-check", help="train a tiny LM with each implementation as its loss; flag drifting ones")
    from cebench.train_check import add_arguments as train_check_arguments

    train_check_arguments(tc)
    tc.set_defaults(func=cmd_train_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, suites.SuiteError, registry.RegistryError, CaseError) as exc:
        print(f"cebench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
