"""A sweep on Ray: one actor per GPU (or per CPU worker), adapters handed out from a queue.

Each actor is a :class:`~sway_common.app.sweep_worker.SweepWorker`: it loads the base at
its first adapter and keeps it. There is no static split: an actor that finishes gets
the next adapter, so a slow adapter never leaves a GPU idle. An actor that dies (a
crash, an out-of-memory kill, a lost node) loses only the adapter it was on: that one
goes back to the front of the queue, once, for another actor (a dead actor is replaced
while more adapters wait than the live actors take in a round, at most as many times as
there were actors). Ray is imported here only, and only when
``--ray`` is given.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from sway_common.app.sweep_worker import Entry, SweepJob, SweepWorker, error_entry

RAY_HINT = (
    "--ray needs Ray: pip install 'sway-mlx[ray]' (or leave out --ray to sweep in this process)"
)
ATTEMPTS = 2
"""An adapter whose worker died is tried once more, on another worker."""


class RayUnavailableError(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise RayUnavailableError(RAY_HINT) from None
    return ray


@dataclass(frozen=True)
class RayPlan:
    """Where and how wide: ``address`` is ``auto`` (a running cluster, else a new one on
    this machine), ``local`` (a new one here) or a cluster address; ``workers`` None means
    as many as the cluster's GPUs (or CPUs) allow."""

    address: str = "auto"
    workers: int | None = None
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0


@contextmanager
def connected(ray: ModuleType, address: str) -> Iterator[None]:
    """Ray, initialised for the sweep (and shut down after it, when started here); a Ray
    already initialised in this process is used as it is."""
    if problem := _unreachable(address):
        raise RayUnavailableError(problem)
    if ray.is_initialized():
        yield
        return
    quiet: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
    }
    try:
        if address == "auto":
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:  # no running cluster: start one here
                ray.init(**quiet)
        else:
            ray.init(address=None if address == "local" else address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        text = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RayUnavailableError(f"cannot start or reach Ray at {address}: {text}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a ``host:port`` (or ``ray://host:port``) address; Ray itself
    would retry for minutes before saying so."""
    if address in ("auto", "local"):
        return None
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        return (
            f"nothing answers at the Ray address {address} ({e.strerror or e}); start the "
            "cluster (ray start --head) or check the address, or use --ray local"
        )
    return None


def worker_shape(resources: dict[str, float], plan: RayPlan, n_adapters: int) -> tuple[int, dict]:
    """How many actors, and each one's resources: one per ``gpus_per_worker`` GPUs when the
    cluster has GPUs (and GPU workers were asked for), else one per ``cpus_per_worker`` CPUs;
    never more than fit at once (an actor waiting for resources would hold its adapter)."""
    gpus = float(resources.get("GPU", 0.0))
    if plan.gpus_per_worker > 0 and gpus >= plan.gpus_per_worker:
        fit = int(gpus // plan.gpus_per_worker)
        options = {"num_gpus": plan.gpus_per_worker, "num_cpus": plan.cpus_per_worker}
    else:
        fit = int(float(resources.get("CPU", 1.0)) // plan.cpus_per_worker)
        options = {"num_gpus": 0, "num_cpus": plan.cpus_per_worker}
    wanted = plan.workers if plan.workers is not None else fit
    return max(1, min(wanted, fit, n_adapters)), options


class _Pool:
    """The live actors, the idle ones, and what each running call is evaluating."""

    def __init__(self, ray: ModuleType, worker_cls: type, job: SweepJob, options: dict, n: int):
        self.ray = ray
        remote = ray.remote(worker_cls)
        self._make: Callable[[], Any] = lambda: remote.options(**options).remote(job)
        self.live = [self._make() for _ in range(n)]
        self.idle = list(self.live)
        self.spares = n
        self.running: dict[Any, tuple[Any, str, str]] = {}

    def submit(self, adapter: str, name: str) -> None:
        # The longest idle first: a worker with the base loaded before a fresh replacement.
        actor = self.idle.pop(0)
        self.running[actor.evaluate.remote(adapter, name)] = (actor, adapter, name)

    def replace(self, waiting: int) -> None:
        """Start an actor in a dead one's place while spares last, when it has work: more
        adapters ``waiting`` than the live actors take in one round, or no actor left."""
        if self.spares > 0 and (waiting > len(self.live) or not self.live):
            self.spares -= 1
            fresh = self._make()
            self.live.append(fresh)
            self.idle.append(fresh)

    def close(self) -> None:
        for actor in self.live:
            self.ray.kill(actor)


def _outcome(ray: ModuleType, pool: _Pool, ref: Any) -> tuple[Entry | None, str | None]:
    """(the entry, None), or (None, why) when the actor died under it."""
    actor, adapter, name = pool.running.pop(ref)
    try:
        entry = ray.get(ref)
    except ray.exceptions.RayTaskError as e:  # raised inside the call: the worker lives on
        pool.idle.append(actor)
        return error_entry(adapter, name, _line(e)), None
    except ray.exceptions.RayError as e:  # the actor (its process, or its node) is gone
        pool.live.remove(actor)
        return None, _line(e)
    pool.idle.append(actor)
    return entry, None


def _line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def run_on_ray(
    job: SweepJob,
    adapters: Sequence[str],
    names: Sequence[str],
    plan: RayPlan,
    on_start: Callable[[str], None],
    on_done: Callable[[Entry], None],
    worker_cls: type | None = None,
) -> int:
    """Every adapter on the cluster's workers; returns how many workers ran.
    ``worker_cls``: the actor class (default :class:`SweepWorker`)."""
    ray = import_ray()
    with connected(ray, plan.address):
        n, options = worker_shape(ray.cluster_resources(), plan, len(adapters))
        pool = _Pool(ray, worker_cls or SweepWorker, job, options, n)
        try:
            _drain(ray, pool, deque(zip(adapters, names, strict=True)), on_start, on_done)
        finally:
            pool.close()
    return n


def _drain(
    ray: ModuleType,
    pool: _Pool,
    queue: deque[tuple[str, str]],
    on_start: Callable[[str], None],
    on_done: Callable[[Entry], None],
) -> None:
    """Hand out adapters until every one has an entry."""
    attempts: Counter[str] = Counter()
    where = {name: adapter for adapter, name in queue}
    while queue or pool.running:
        while pool.idle and queue:
            adapter, name = queue.popleft()
            pool.submit(adapter, name)
            on_start(name)
        if not pool.running:  # every worker died and no spare is left
            for adapter, name in queue:
                on_done(error_entry(adapter, name, "not evaluated: every worker died"))
            return
        [ref], _ = ray.wait(list(pool.running), num_returns=1)
        name = pool.running[ref][2]
        attempts[name] += 1
        entry, died = _outcome(ray, pool, ref)
        if entry is None and attempts[name] < ATTEMPTS:
            queue.appendleft((where[name], name))  # retried once, on another worker
            pool.replace(len(queue))
            continue
        if entry is None:
            entry = error_entry(where[name], name, f"its worker died {ATTEMPTS} times: {died}")
            pool.replace(len(queue))
        entry["attempts"] = attempts[name]
        on_done(entry)
