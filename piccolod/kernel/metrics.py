"""
Prometheus metrics of the kernel, in the text format at ``GET /metrics``.

Hot paths only bump plain counters: the bus, the dispatcher's audit, the
job runner and the HTTP router keep their own; the
:class:`CommandMetrics` middleware adds a latency histogram per command
and outcome with one ``bisect`` and two increments.  Everything is turned
into Prometheus families at scrape time by :class:`KernelCollector`, on a
private ``CollectorRegistry`` (never the process-global one), together with
prometheus-client's own process collector (RSS, CPU, open files).
prometheus-client itself is imported at the first scrape: a daemon nobody
scrapes does not pay its memory.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from piccolod.commands import Command, CommandContext
from piccolod.errors import PiccolodError
from piccolod.events import ChildState
from piccolod.kernel.dispatcher import ChainedMiddleware, Next

#: Latency buckets (seconds) for commands and HTTP requests.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0,
)  # fmt: skip

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@attrs.define(eq=False)
class Histogram:
    """Cumulative-at-scrape histogram: one bucket increment per observation."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = attrs.field(init=False)
    total: float = 0.0

    def __attrs_post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Prometheus ``(le, cumulative count)`` pairs, ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((repr(float(bound)), float(running)))
        running += self.counts[-1]
        out.append(("+Inf", float(running)))
        return out

    @property
    def count(self) -> int:
        return sum(self.counts)


@attrs.define(eq=False)
class CommandMetrics(ChainedMiddleware):
    """
    A latency histogram per command name and outcome (``ok`` or
    ``error:<type>``).  On the kernel's dispatcher it is an observer of the
    audit middleware (:meth:`observe`), which times every command anyway;
    on a dispatcher without one it works as a middleware in the
    ``metrics`` slot.
    """

    clock: IReactorTime
    histograms: dict[tuple[str, str], Histogram] = attrs.field(factory=dict)

    def observe(self, name: str, outcome: str, duration: float) -> None:
        h = self.histograms.get((name, outcome))
        if h is None:
            h = self.histograms[(name, outcome)] = Histogram()
        h.counts[bisect.bisect_left(h.bounds, duration)] += 1
        h.total += duration

    def bind(self, next: Next) -> Next:
        seconds = self.clock.seconds
        histograms = self.histograms
        #: The ``ok`` histogram per command name: the hot path's one lookup.
        ok: dict[str, Histogram] = {}
        bisect_left = bisect.bisect_left

        def observe(name: str, outcome: str, duration: float) -> None:
            h = histograms.get((name, outcome))
            if h is None:
                h = histograms[(name, outcome)] = Histogram()
                if outcome == "ok":
                    ok[name] = h
            h.observe(duration)

        def finished(result: Any, name: str, start: float) -> Any:
            if isinstance(result, Failure):
                error = result.value
                kind = error.type if isinstance(error, PiccolodError) else "internal"
                observe(name, f"error:{kind}", seconds() - start)
            else:
                observe(name, "ok", seconds() - start)
            return result

        def metrics(command: Command, context: CommandContext) -> Deferred[Any]:
            start = seconds()
            d = next(command, context)
            if d.called and not d.paused and not isinstance(d.result, Failure):
                duration = seconds() - start
                h = ok.get(command.name)
                if h is None:
                    observe(command.name, "ok", duration)
                else:  # Histogram.observe, inlined
                    h.counts[bisect_left(h.bounds, duration)] += 1
                    h.total += duration
                return d
            return d.addBoth(finished, command.name, start)

        return metrics


@attrs.define(eq=False)
class HTTPMetrics:
    """Requests by method, route template and status, with latency per route."""

    requests: dict[tuple[str, str, int], int] = attrs.field(factory=dict)
    latency: dict[str, Histogram] = attrs.field(factory=dict)

    def observe(self, method: str, route: str, status: int, duration: float) -> None:
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.latency.get(route)
        if h is None:
            h = self.latency[route] = Histogram()
        h.observe(duration)


@attrs.define(eq=False)
class KernelCollector:
    """
    Turns the kernel's counters into Prometheus families at scrape time.

    Every source is optional, so a partial kernel (tests, tools) still
    scrapes.  ``lag`` returns the last measured reactor lag in seconds.
    """

    bus: Any = None
    dispatcher: Any = None
    command_metrics: CommandMetrics | None = None
    jobs: Any = None
    supervisor: Any = None
    health: Any = None
    http: HTTPMetrics | None = None
    lag: Callable[[], float] | None = None

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        yield from self._bus()
        yield from self._commands()
        yield from self._jobs()
        yield from self._supervisor()
        yield from self._health()
        yield from self._http()
        if self.lag is not None:
            g = GaugeMetricFamily(
                "piccolod_reactor_lag_seconds",
                "How late the reactor ran the last lag probe (blocking work shows here).",
            )
            g.add_metric([], self.lag())
            yield g

    def _bus(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        if self.bus is None:
            return
        stats = self.bus.stats()
        families = {
            name: CounterMetricFamily(
                f"piccolod_bus_{name}", f"Events {name} per topic.", labels=["topic"]
            )
            for name in ("published", "delivered", "dropped", "failed")
        }
        for t in stats["topics"]:
            for name, family in families.items():
                family.add_metric([t.topic], getattr(t, name))
        yield from families.values()
        depth = GaugeMetricFamily(
            "piccolod_bus_queue_depth", "Events queued per subscription.", labels=["subscription"]
        )
        sub_dropped = CounterMetricFamily(
            "piccolod_bus_subscription_dropped",
            "Events dropped per subscription (overflow or cancel).",
            labels=["subscription"],
        )
        for s in stats["subscriptions"]:
            depth.add_metric([s.name], s.queued)
            sub_dropped.add_metric([s.name], s.dropped)
        yield depth
        yield sub_dropped

    def _commands(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            HistogramMetricFamily,
        )

        if self.dispatcher is not None:
            counts = CounterMetricFamily(
                "piccolod_commands",
                "Commands dispatched per name and outcome.",
                labels=["command", "outcome"],
            )
            for name, s in self.dispatcher.stats()["commands"].items():
                for outcome, n in s["outcomes"].items():
                    counts.add_metric([name, outcome], n)
            yield counts
        if self.command_metrics is not None:
            h = HistogramMetricFamily(
                "piccolod_command_duration_seconds",
                "Command latency through the middleware chain.",
                labels=["command", "outcome"],
            )
            for (name, outcome), hist in sorted(self.command_metrics.histograms.items()):
                h.add_metric([name, outcome], hist.buckets(), hist.total)
            yield h

    def _jobs(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        if self.jobs is None:
            return
        stats = self.jobs.stats()
        ended = CounterMetricFamily(
            "piccolod_jobs", "Jobs ended per class and final state.", labels=["job_class", "state"]
        )
        retries = CounterMetricFamily(
            "piccolod_job_retries", "Job retries per class.", labels=["job_class"]
        )
        running = GaugeMetricFamily(
            "piccolod_jobs_running", "Running jobs per class.", labels=["job_class"]
        )
        queued = GaugeMetricFamily(
            "piccolod_jobs_queued", "Queued jobs per class.", labels=["job_class"]
        )
        duration = GaugeMetricFamily(
            "piccolod_job_duration_seconds_sum",
            "Total run time of ended jobs per class.",
            labels=["job_class"],
        )
        count = CounterMetricFamily(
            "piccolod_job_duration_seconds_count",
            "Ended jobs with a duration, per class.",
            labels=["job_class"],
        )
        for name, c in stats["classes"].items():
            for state in ("succeeded", "failed", "cancelled"):
                ended.add_metric([name, state], c[state])
            retries.add_metric([name], c["retries"])
            running.add_metric([name], c["running"])
            queued.add_metric([name], c["queued"])
            duration.add_metric([name], c["duration_sum"])
            count.add_metric([name], c["duration_count"])
        yield from (ended, retries, running, queued, duration, count)

    def _supervisor(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
        )

        if self.supervisor is None:
            return
        restarts = CounterMetricFamily(
            "piccolod_supervisor_restarts", "Restarts per supervised child.", labels=["child"]
        )
        state = GaugeMetricFamily(
            "piccolod_supervisor_child_state",
            "1 for the state each supervised child is in, 0 for the others.",
            labels=["child", "state"],
        )
        for child in self.supervisor.children():
            restarts.add_metric([child.name], child.restarts)
            for s in ChildState:
                state.add_metric([child.name, s.value], 1.0 if child.state is s else 0.0)
        yield restarts
        yield state

    def _health(self) -> Iterator[Any]:
        from prometheus_client.core import (
            GaugeMetricFamily,
        )

        if self.health is None:
            return
        level = GaugeMetricFamily(
            "piccolod_health_level",
            "Health per component: 0 ok, 1 warn, 2 error.",
            labels=["component"],
        )
        for c in self.health.components():
            level.add_metric([c.component], int(c.level))
        yield level
        ready = GaugeMetricFamily("piccolod_ready", "1 when every required component is ok.")
        ready.add_metric([], 1.0 if self.health.ready() else 0.0)
        yield ready

    def _http(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            HistogramMetricFamily,
        )

        if self.http is None:
            return
        counts = CounterMetricFamily(
            "piccolod_http_requests",
            "HTTP requests per method, route and status.",
            labels=["method", "route", "status"],
        )
        for (method, route, status), n in sorted(self.http.requests.items()):
            counts.add_metric([method, route, str(status)], n)
        yield counts
        h = HistogramMetricFamily(
            "piccolod_http_request_duration_seconds",
            "HTTP request latency per route.",
            labels=["route"],
        )
        for route, hist in sorted(self.http.latency.items()):
            h.add_metric([route], hist.buckets(), hist.total)
        yield h


@attrs.define(eq=False)
class KernelMetrics:
    """The registry ``/metrics`` serves, and the hot-path recorders feeding it."""

    collector: KernelCollector
    commands: CommandMetrics
    http: HTTPMetrics
    process: bool = True
    _registry: Any = None

    @classmethod
    def build(
        cls,
        clock: IReactorTime,
        *,
        bus: Any = None,
        dispatcher: Any = None,
        jobs: Any = None,
        supervisor: Any = None,
        health: Any = None,
        lag: Callable[[], float] | None = None,
        process: bool = True,
    ) -> KernelMetrics:
        commands = CommandMetrics(clock)
        http = HTTPMetrics()
        collector = KernelCollector(
            bus=bus,
            dispatcher=dispatcher,
            command_metrics=commands,
            jobs=jobs,
            supervisor=supervisor,
            health=health,
            http=http,
            lag=lag,
        )
        audit = getattr(dispatcher, "audit", None)
        if audit is not None and hasattr(audit, "observers"):
            audit.observers.append(commands.observe)
        elif dispatcher is not None:
            dispatcher.add_middleware("metrics", commands)
        return cls(collector=collector, commands=commands, http=http, process=process)

    @property
    def registry(self) -> Any:
        """The private ``CollectorRegistry``, built (and prometheus-client imported) once."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry, ProcessCollector

            registry = CollectorRegistry(auto_describe=False)
            registry.register(self.collector)  # type: ignore[arg-type]
            if self.process:
                ProcessCollector(namespace="piccolod", registry=registry)
            self._registry = registry
        return self._registry

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        from prometheus_client.exposition import generate_latest

        text: bytes = generate_latest(self.registry)
        return text

    def snapshot(self) -> Mapping[str, float]:
        """``{"name{labels}": value}`` of every sample (tests, piccolodctl)."""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out
