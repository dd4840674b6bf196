"""Worker processes: implementations run outside the main process, so a crash is a result.

A segfault, an abort, `sys.exit`, a CUDA illegal memory access or a device-side assert
in one implementation must not end the run nor lose anyone else's rows. The parent
(`Worker`) starts one process per implementation and reuses it for all of that
implementation's tasks; after a crash the next task gets a fresh process. CUDA does not
survive a fork, so workers come from multiprocessing's "forkserver": a fresh process
that imports torch once (without touching CUDA) and forks a worker per request, so the
seconds of the torch import are paid once per run, not once per worker (a worker then
starts in milliseconds; "spawn" where there is no forkserver).

A task is `(module, function, impl name, kwargs)`: the worker imports the function and
calls it as `function(impl, **kwargs)`; it is a generator whose messages (tuples) are sent back
over a pipe as they are produced, so the parent can write each row at once. After the
last message the worker sends ("done",). When the process dies instead, or a task runs
past its time limit (the worker is then killed), `Worker.run` raises `WorkerDied` with
the status ("failed" or "timeout"), the exit code or signal name and the tail of the
worker's output, and the next task starts a fresh process.

The worker's stdout and stderr go to a log file (kept in the run directory) with
faulthandler on, so a segfault leaves a Python traceback whose tail ends up in the
reason. A CUDA context that has seen an error is poisoned for good: after every task
on CUDA the worker synchronizes, and if that fails it exits so the next task gets a
fresh process. The worker also exits when the parent goes away (the pipe closes, and
on Linux it asks to be sent SIGKILL when its parent dies).
"""

from __future__ import annotations

import ctypes
import faulthandler
import importlib
import multiprocessing
import os
import re
import signal
import sys
import sysconfig
import time
import traceback
from collections.abc import Iterator
from pathlib import Path


def _context():
    """forkserver where there is one: a clean server process (spawned, never touching CUDA) imports
    torch once, and every worker is a fork of it, ready in milliseconds instead of seconds; else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # torch._dynamo too: the CPU memory profiler imports it on first use (~2 s), as does torch.compile
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "cebench.runner", "cebench.conformance"])
    return ctx


_CTX = _context()
_TAIL_CHARS = 400
STARTUP_TIMEOUT_S = 300.0


class WorkerDied(Exception):
    """The worker ended (crash, exit, time limit) before finishing its task."""

    def __init__(self, status: str, reason: str):
        super().__init__(f"{status}: {reason}")
        self.status, self.reason = status, reason


class Worker:
    """A worker process that serves implementations from one file; started on first use and after every death."""

    def __init__(self, source_file: str, plugins: list[str], device: str, log_path: Path):
        self.source_file, self.plugins, self.device = source_file, list(plugins), device
        self.log_path = Path(log_path)
        self.proc = None
        self.conn = None

    def _start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        parent_end, child_end = _CTX.Pipe()
        self.proc = _CTX.Process(target=_worker_main, name=f"cebench-{Path(self.source_file).stem}", daemon=True,
                                 args=(child_end, self.source_file, self.plugins, self.device, str(self.log_path)))
        self.proc.start()
        child_end.close()  # so that the parent sees EOF when the child dies
        self.conn = parent_end
        # start-up (torch import, loading the plugin) is not part of any case's time limit
        if not self.conn.poll(STARTUP_TIMEOUT_S):
            self.stop(kill=True)
            raise WorkerDied("failed", f"worker did not start within {STARTUP_TIMEOUT_S:g} s")
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            raise self._death(f"while loading {self.source_file}") from None
        if message[0] != "ready":
            self.stop(kill=True)
            raise WorkerDied("failed", f"worker could not load {self.source_file}: {message[1]}")

    def run(self, task: tuple[str, str, str, dict], timeout: float | None = None) -> Iterator[tuple]:
        """Messages of `task` as the worker produces them; raises WorkerDied if it never finishes."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(task)
        deadline = None if not timeout else time.monotonic() + timeout
        while True:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                self.stop(kill=True)
                raise WorkerDied("timeout", f"ran past the time limit of {timeout:g} s; worker killed")
            if self.conn.poll(wait):
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    raise self._death() from None
                if message[0] == "done":
                    return
                if message[0] == "exiting":  # poisoned CUDA context: let it go, start afresh next time
                    self.proc.join(10)
                    self.proc = None
                    yield ("poisoned", message[1])
                    return
                yield message
            elif not self.proc.is_alive():
                raise self._death()

    def _death(self, when: str = "") -> WorkerDied:
        self.proc.join(10)
        code = self.proc.exitcode
        self.proc = None
        if code is None:
            how = "worker stopped answering"
        elif code < 0:
            how = f"worker killed by signal {_signal_name(-code)}"
        else:
            how = f"worker exited with code {code}"
        tail = self.log_tail()
        return WorkerDied("failed", how + (f" {when}" if when else "") + (f"; last output: {tail}" if tail else ""))

    def log_tail(self) -> str:
        """What the worker printed since it started, on one line: the fatal error and where, or the last lines."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        fatal = re.search(r"Fatal Python error: ([^\n]*)", text)
        if fatal:  # faulthandler: the innermost frame comes first after the error line
            frames = re.findall(r'File "([^"]*)", line (\d+) in (\S+)', text[fatal.end():])
            # the innermost frame outside the standard library: the implementation's own line
            stdlib = sysconfig.get_paths()["stdlib"]
            ours = [f for f in frames if not f[0].startswith(stdlib)] or frames
            where = f" in {ours[0][2]} at {ours[0][0]}:{ours[0][1]}" if ours else ""
            return f"Fatal Python error: {fatal.group(1).strip()}{where}"
        return " ".join(text.split())[-_TAIL_CHARS:]

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.close()  # the worker sees EOF and returns
            except OSError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc.join(10)
        self.proc = None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# ---------------------------------------------------------------- inside the worker process


def _worker_main(conn, source_file: str, plugins: list[str], device: str, log_path: str) -> None:
    _redirect_output(log_path)
    faulthandler.enable()
    _die_with_parent()
    try:
        _load_source(source_file)
    except Exception as exc:
        conn.send(("load_failed", f"{type(exc).__name__}: {exc}"))
        return
    for module in ("cebench.runner", "cebench.conformance"):  # task modules: imported before any time limit runs
        importlib.import_module(module)
    conn.send(("ready",))
    while True:
        try:
            module, function, impl_name, kwargs = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        task = getattr(importlib.import_module(module), function)
        try:
            impl = _find_impl(impl_name, plugins)
            for message in task(impl, **kwargs):
                conn.send(message)
        except Exception as exc:  # a harness error inside the task: report it, keep the worker
            # the exception on one line too: a CUDA error's message spans lines and ends in advice
            conn.send(("error", traceback.format_exc(limit=6), f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]))
        poisoned = _cuda_poisoned(device)
        if poisoned:
            conn.send(("exiting", poisoned))
            return
        conn.send(("done",))


def _redirect_output(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _die_with_parent() -> None:
    try:  # a crashing plugin must not spend seconds writing a core file of a process holding torch
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ImportError, ValueError, OSError):
        pass
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _load_source(source_file: str) -> None:
    """Import the implementation file by path (only it: the other plugins need not load here)."""
    from cebench import registry

    if source_file and Path(source_file).is_file():
        registry.load_file(source_file)


def _find_impl(name: str, plugins: list[str]):
    """The implementation named `name`; loads every plugin if its file did not define it."""
    from cebench import registry

    impl = registry.registry().get(name) or registry.load_all(plugins).get(name)
    if impl is None:
        raise LookupError(f"implementation {name!r} not found after loading its plugins")
    return impl


def source_file(impl) -> str:
    """The file an implementation was defined in: the unit a worker process serves."""
    return impl.source.rsplit(":", 1)[0]


def _cuda_poisoned(device: str) -> str | None:
    if not device.startswith("cuda"):
        return None
    import torch

    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as exc:  # the context has seen an error (illegal access, device-side assert)
        return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
    return None
