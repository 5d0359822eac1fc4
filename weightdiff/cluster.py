"""Where independent tasks run: on Dask distributed, or one after another in this process.

``weightdiff survey`` (one task per tuned model) and a split ``weightdiff compare``
(one task per group of tensor pairs) hand a list of argument tuples and a top-level
task function to a runner and receive ``Outcome``s as tasks finish. Two runners with
the same verb, ``map``:

    Sequential  this process, in order; what runs when Dask is not installed
    DaskRunner  a ``distributed.Client``: an existing cluster (``--scheduler ADDRESS``)
                or a ``LocalCluster`` of worker processes on 127.0.0.1 (``--workers N``)

Tasks compute and return results; only the parent writes files, so a result is the
same bytes whichever runner produced it. Tasks catch the errors they expect and
return them as data; anything that still escapes a task (a worker that died more
often than the scheduler allows, a result that cannot be unpickled) becomes an
``Outcome`` with a one-line ``error``. Dask reruns a task whose worker died
(``distributed.scheduler.allowed-failures``) and, with ``retries``, one that raised.
A scheduler that goes away is no task's failure: ``map`` raises ``ClusterLost``
(exit code 2) and the tasks not done are left for a rerun; distributed's own log
lines about the lost connection are silenced while a runner is in use.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from .errors import OptionsError, WeightdiffError, escape_name

DASK_HINT = "pip install 'weightdiff[dask]'"
#: reruns of a task that raised (a worker that died is rerun by the scheduler's allowed-failures)
RETRIES = 2


def have_dask() -> bool:
    """True when ``distributed`` can be imported (the ``dask`` extra)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Outcome:
    """The result of task ``index`` (its position in the list given to ``map``), or why there is none."""

    index: int
    value: Any = None
    error: str | None = None
    killed: bool = False       # the worker processes running it died (Dask's KilledWorker): most often memory


#: what a task whose workers died is reported as (the workers' memory limit is the usual cause)
KILLED = ("the worker processes running it died (killed, most often for want of memory: each local worker has a "
          "share of the machine's memory, or --worker-memory); give the workers more memory, or run fewer of them")


def _killed(exc: BaseException) -> bool:
    return type(exc).__name__ == "KilledWorker"


def _one_line(exc: BaseException) -> str:
    """An exception from the cluster as one line: its lines joined by spaces, control characters escaped.

    >>> _one_line(ValueError("bad\\nvalue"))
    'worker failed: ValueError: bad value'
    """
    if isinstance(exc, WeightdiffError):
        return exc.one_line()
    if _killed(exc):
        return KILLED
    try:
        text = str(exc)
    except Exception:          # an exception whose __str__ fails (distributed's own, with half its state)
        text = ""
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return escape_name(f"worker failed: {type(exc).__name__}: {text}")


class ClusterLost(WeightdiffError):
    """The connection to the Dask scheduler was lost while tasks ran (exit code 2, like a scheduler that
    cannot be reached): the cluster's failure, not the tasks'."""


#: the client states of a connection that is gone (distributed retries, then closes)
_GONE = ("connecting", "closing", "closed", "failed")


def _lost(exc: BaseException, client: Any) -> bool:
    """Whether a task's exception says the scheduler went away rather than the task failed: distributed
    cancels every pending future with reason ``scheduler-connection-lost`` when the connection drops."""
    if getattr(exc, "reason", None) == "scheduler-connection-lost":
        return True
    if type(exc).__name__ in ("CommClosedError", "CancelledError", "FutureCancelledError"):
        return str(getattr(client, "status", "running")) in _GONE
    return False


class Sequential:
    """Run each task in this process, in order (no Dask needed)."""

    description = "this process"
    workers = 1

    def map(self, fn: Callable, args: Sequence[tuple], name: str = "task") -> Iterator[Outcome]:
        for i, a in enumerate(args):
            yield Outcome(i, fn(*a))


class DaskRunner:
    """Run each task on a Dask cluster through ``client``; outcomes come as tasks finish."""

    def __init__(self, client: Any, description: str):
        self.client = client
        self.description = description

    @property
    def workers(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def map(self, fn: Callable, args: Sequence[tuple], name: str = "task") -> Iterator[Outcome]:
        from distributed import as_completed

        run = uuid.uuid4().hex[:8]
        futures = {}
        for i, a in enumerate(args):
            fut = self.client.submit(fn, *a, key=f"weightdiff-{name}-{run}-{i}", pure=False, retries=RETRIES)
            futures[fut] = i
        lost = False
        try:
            for fut in as_completed(list(futures), loop=self.client.loop):
                i = futures[fut]
                try:
                    value = fut.result()
                except Exception as exc:   # a task that failed on the cluster: one line, not a traceback
                    if _lost(exc, self.client):
                        lost = True
                        why = "the scheduler stopped, or the network to it failed" \
                            if getattr(exc, "reason", None) == "scheduler-connection-lost" \
                            else _one_line(exc).removeprefix("worker failed: ")
                        raise ClusterLost(f"lost the connection to the {self.description} ({why})") from None
                    outcome = Outcome(i, None, _one_line(exc), killed=_killed(exc))
                else:
                    outcome = Outcome(i, value)
                finally:
                    fut.release()
                yield outcome
        finally:
            if not lost:           # a lost client cancels nothing: its futures are gone already
                for fut in futures:
                    if not fut.done():
                        fut.cancel()


def check(scheduler: str | None, workers: int | None, memory_limit: str | None = None) -> None:
    """Raise OptionsError for a request no runner can honour (before anything is written)."""
    if workers is not None and workers < 1:
        raise OptionsError(f"--workers must be at least 1 (got {workers})")
    if scheduler is not None and workers is not None:
        raise OptionsError("give --scheduler or --workers, not both",
                           "--workers starts a local cluster; an existing cluster has its own workers")
    if memory_limit is not None and workers is None:
        raise OptionsError("--worker-memory sets the memory of the local workers: give --workers N too")
    if scheduler is not None and not have_dask():
        raise OptionsError("--scheduler needs Dask distributed, which is not installed", DASK_HINT)


@contextmanager
def runner(scheduler: str | None = None, workers: int | None = None, memory_limit: str | None = None,
           client: Any = None, say: Callable[[str], None] = lambda m: None) -> Iterator[Sequential | DaskRunner]:
    """The runner for the CLI's ``--scheduler`` / ``--workers`` / ``--worker-memory`` options.

    ``client``: an existing ``distributed.Client`` (used as is, not closed). ``scheduler``:
    connect to that address. ``workers``: start a ``LocalCluster`` of that many worker
    processes (one thread each, 127.0.0.1 only, no dashboard), closed on exit;
    ``memory_limit`` (``"4GB"``) per worker, else Dask's share of the machine. With
    neither, or without Dask installed and no ``scheduler``, the tasks run in this process.
    """
    if client is not None:
        yield DaskRunner(client, f"Dask cluster at {client.scheduler.address}")
        return
    check(scheduler, workers, memory_limit)
    if scheduler is None and workers is None:
        yield Sequential()
        return
    if not have_dask():
        say(f"Dask is not installed ({DASK_HINT}): --workers {workers} ignored, running in this process")
        yield Sequential()
        return
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with quiet_distributed():
            try:
                cl = Client(scheduler, timeout="15s", set_as_default=False)
            except (OSError, TimeoutError, ValueError) as exc:
                raise WeightdiffError(
                    f"cannot reach the Dask scheduler at {scheduler} ({type(exc).__name__}: {exc})",
                    "is `dask scheduler` running there, and is the address tcp://HOST:PORT?") from None
            try:
                yield DaskRunner(cl, f"Dask cluster at {scheduler}")
            finally:
                cl.close(timeout=5)
        return
    # no dashboard; the scheduler's HTTP routes (health, metrics) on a free port: on 8787, taken by
    # another cluster, distributed warned on stderr "Port 8787 is already in use" even with -q
    with _sigint_held() as held:    # the worker processes never see it: a terminal's Ctrl-C acts here alone
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, memory_limit=memory_limit or "auto", silence_logs=50,
                               scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    try:
        held.deliver()                      # pressed while the cluster started: acted on now, the cluster closed
        cl = Client(cluster, set_as_default=False)
        try:
            yield DaskRunner(cl, f"local Dask cluster of {workers} worker process(es)")
        finally:
            cl.close()
    finally:
        cluster.close()


@dataclass
class _Held:
    interrupted: bool = False

    def deliver(self) -> None:
        """A SIGINT recorded while held, sent again to this process's own handler (Python's raises
        KeyboardInterrupt here; one set by the caller runs as it would have)."""
        if self.interrupted:
            import signal

            self.interrupted = False
            signal.raise_signal(signal.SIGINT)


@contextmanager
def _sigint_held():
    """SIGINT held while the worker processes start, so that they start with it blocked and never act on it: a
    terminal's Ctrl-C goes to the whole process group, and every worker printed its own KeyboardInterrupt and
    CancelledError tracebacks before this process's one line. This process stops the cluster on its own
    KeyboardInterrupt.

    The signal is blocked in this thread (Linux keeps a blocked signal pending, and the signal mask is inherited
    by the threads started here, distributed's IO loop and the threads that spawn the workers, and by every process
    they start, across exec); a Ctrl-C pressed meanwhile is recorded, not lost, and ``interrupted`` says so when
    the block ends (a SIGINT taken by a thread that does not block it, BLAS's, reaches the recording handler), and
    ``deliver`` sends it again to the handler that was there before (a caller's own handler runs as it would have).
    Ignoring the signal instead (SIG_IGN, inherited too) lost a Ctrl-C pressed during the cluster's start-up: the
    comparison ran to its end."""
    import signal
    import threading

    held = _Held()
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        yield held      # a process that ignores SIGINT (started in the background; the workers inherit that), or
        return          # whose handler was set outside Python (it could not be put back)
    if not sys.platform.startswith("linux"):          # elsewhere a blocked, ignored signal may be discarded
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited: the workers ignore it (one lost here)
        try:
            yield held
        finally:
            signal.signal(signal.SIGINT, old)
        return
    # multiprocessing's resource tracker, started by the first spawn, unblocks SIGINT in the thread that starts
    # it, and that thread then spawns the workers: a worker started with it unblocked died of a Ctrl-C pressed
    # while it imported ("Nanny failed to start"). Started here, before the block, the spawns leave the mask alone.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()

    def record(signum, frame):
        held.interrupted = True

    old = signal.signal(signal.SIGINT, record)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield held
    finally:
        try:
            if signal.sigtimedwait({signal.SIGINT}, 0) is not None:     # pending: taken here, without waiting
                held.interrupted = True
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            signal.signal(signal.SIGINT, old)


#: the loggers whose records about a lost or closing connection would reach stderr (distributed's own
#: configuration gives ``distributed.client`` a level of its own, so each is set, not only the parent)
_NOISY = ("distributed", "tornado")


@contextmanager
def quiet_distributed() -> Iterator[None]:
    """Silence distributed's (and tornado's) loggers while a client to a remote scheduler is in use: a lost
    scheduler made ``distributed.client`` log a 40-line traceback on stderr, beside the one line that
    says what happened. Their levels are put back on exit."""
    names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _NOISY] + list(_NOISY)
    saved = {n: logging.getLogger(n).level for n in names}
    for n in saved:
        logging.getLogger(n).setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def worker_threads(workers: int | None) -> int | None:
    """Kernel threads per task when ``workers`` processes share this machine (None: let each decide)."""
    if not workers:
        return None
    return max(1, (os.cpu_count() or 1) // workers)
