"""Shared test set-up: the Triton interpreter on CPU, the registry loaded once, and the list of skips.

Every skip is listed at the end of a run with its reason. On CI (.ci/run sets CEBENCH_CI=1) the
only skips allowed are the GPU-only ones, whose reason says "CUDA-only" (a peer that needs a GPU:
cce, quack); any other skip makes the run fail, so a missing test dependency cannot turn into
a silent skip there.
"""

import os

import torch

# Triton kernels run on the CPU through the interpreter; the variable must be set before
# any @triton.jit function is defined, i.e. before the implementation files are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cebench import registry  # noqa: E402

ON_CI = os.environ.get("CEBENCH_CI") == "1"
ALLOWED_ON_CI = "CUDA-only"  # the words a skip's reason must carry to be allowed on CI
_skips: list[tuple[str, str]] = []  # (test id, reason)


@pytest.fixture(scope="session")
def impls():
    return registry.load_all()


def _needs_newer_torch(reason: str | None) -> bool:
    # torch_linear's reason on a torch without F.linear_cross_entropy (before 2.13, e.g. the GPU image's 2.11)
    return bool(reason) and reason.startswith(f"torch {torch.__version__} has no")


def require_runnable(impl, reason: str | None = None) -> None:
    """An implementation these CPU tests need must run: a missing test dependency fails, it is not a skip. One
    that needs a newer torch than this one is skipped with that reason (a skip CI does not allow)."""
    reason = impl.unavailable_reason() if reason is None else reason
    if _needs_newer_torch(reason):
        pytest.skip(f"{impl.name}: {reason} (it needs a newer torch)")
    assert not reason, f"{impl.name}: {reason} (the test dependencies are missing: pip install -e '.[test]')"


@pytest.fixture(scope="session")
def runnable():
    return require_runnable


@pytest.fixture(scope="session")
def needs_newer_torch(impls) -> set[str]:
    """Implementations this torch is too old for, left out of the tests that run every built-in; none on CI."""
    names = {name for name, impl in impls.items() if _needs_newer_torch(impl.unavailable_reason())}
    assert not (ON_CI and names), f"CI's torch {torch.__version__} must run {sorted(names)}"
    return names


def _record_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):  # an xfail is reported as skipped too
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _skips.append((report.nodeid, reason.removeprefix("Skipped: ")))


def pytest_runtest_logreport(report):
    _record_skip(report)


def pytest_collectreport(report):
    _record_skip(report)  # a whole module skipped while it was collected


def _not_allowed() -> list[tuple[str, str]]:
    return [(test, reason) for test, reason in _skips if ALLOWED_ON_CI not in reason] if ON_CI else []


def pytest_sessionfinish(session, exitstatus):
    if _not_allowed() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _skips:
        return
    terminalreporter.section(f"{len(_skips)} skipped" + (" (CI allows only CUDA-only ones)" if ON_CI else ""))
    bad = set(_not_allowed())
    for test, reason in _skips:
        terminalreporter.write_line(f"{'NOT ALLOWED ON CI: ' if (test, reason) in bad else ''}{test}: {reason}")
    if bad:
        terminalreporter.write_line(f"{len(bad)} skip(s) not allowed on CI: the run fails", red=True)
