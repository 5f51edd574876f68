"""Prometheus metrics (DESIGN §7) on an injected `CollectorRegistry` (never the global REGISTRY).

Label values come only from the closed sets below, and every combination is created up front so
each series exists at 0 from the first scrape (rate() and absent() behave, dashboards show 0, not
"no data"). The hot path never looks labels up: it uses the bound children kept here.

    metrics = Metrics(CollectorRegistry())
    metrics.client_connections.inc()                       # / .dec()
    metrics.count_statement("allowed", classification.classes)
    metrics.statements["denied", "write"].inc()            # the same, when sensitivity is known
    metrics.statement_seconds.observe(seconds)             # end to end, hold time excluded
    metrics.classify_seconds.observe(seconds)
    metrics.classify_cache["hit"].inc()
    metrics.holds_active.inc(); metrics.hold_seconds["released"].observe(waited)
    metrics.stepup["bad_code"].inc()
    metrics.upstream_errors["connect"].inc()
    metrics.policy_reloads["ok"].inc()
    metrics.audit_errors.inc()                             # AuditSink(on_error=...)
    text = metrics.exposition()                            # what /metrics serves
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from pgguard.classify import StatementClass
from pgguard.observability.tally import Tally, TallyHistogram

__all__ = [
    "CLASSIFY_BUCKETS",
    "CLASSIFY_CACHE_RESULTS",
    "DECISIONS",
    "HOLD_BUCKETS",
    "HOLD_OUTCOMES",
    "METRIC_NAMES",
    "RELOAD_RESULTS",
    "SENSITIVITIES",
    "SENSITIVITY_ORDER",
    "STATEMENT_BUCKETS",
    "STEPUP_RESULTS",
    "UPSTREAM_ERROR_KINDS",
    "Metrics",
    "sensitivity",
]

# -- the closed label sets (DESIGN §7) -------------------------------------------------------------

DECISIONS = ("allowed", "denied", "held", "released", "timed_out", "canceled")
# Most sensitive first: a statement counts under the first of its classes in this order.
SENSITIVITY_ORDER: tuple[StatementClass, ...] = (
    StatementClass.UNKNOWN, StatementClass.ADMIN, StatementClass.DDL, StatementClass.WRITE,
    StatementClass.PII, StatementClass.READ, StatementClass.TX)
SENSITIVITIES = tuple(c.value for c in SENSITIVITY_ORDER)
CLASSIFY_CACHE_RESULTS = ("hit", "miss")
HOLD_OUTCOMES = ("released", "timeout", "cancel", "disconnect", "shutdown")
STEPUP_RESULTS = ("success", "bad_code", "replay", "locked", "unknown_session", "not_enrolled")
UPSTREAM_ERROR_KINDS = ("connect", "tls", "auth", "reset")
RELOAD_RESULTS = ("ok", "error")

# -- buckets -------------------------------------------------------------------------------------

# Classification is µs work (a cache hit is ~1 µs, a parse tens to hundreds of µs).
CLASSIFY_BUCKETS = (2e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
                    1e-2, 5e-2)
# Statements: sub-millisecond round trips to minutes-long reports.
STATEMENT_BUCKETS = (5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
# Holds: a person fetching a code takes seconds; the default timeout is 120 s.
HOLD_BUCKETS = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0,
                600.0)

# Every pgguard series name (as exposed; counters also get _created, histograms _bucket etc.).
METRIC_NAMES: Mapping[str, str] = {
    "pgguard_client_connections": "gauge",
    "pgguard_statements_total": "counter",
    "pgguard_statement_seconds": "histogram",
    "pgguard_classify_seconds": "histogram",
    "pgguard_classify_cache_total": "counter",
    "pgguard_holds_active": "gauge",
    "pgguard_hold_seconds": "histogram",
    "pgguard_stepup_total": "counter",
    "pgguard_upstream_errors_total": "counter",
    "pgguard_policy_reloads_total": "counter",
    "pgguard_audit_errors_total": "counter",
}



def _most_sensitive(classes: frozenset[StatementClass]) -> str:
    return next((c.value for c in SENSITIVITY_ORDER if c in classes), StatementClass.TX.value)


# A constant table over all 2^7 class sets: the per-statement call is one dict lookup.
_SENSITIVITY: Mapping[frozenset[StatementClass], str] = {
    s: _most_sensitive(s)
    for s in (frozenset(c for i, c in enumerate(StatementClass) if mask >> i & 1)
              for mask in range(1 << len(StatementClass)))}


def sensitivity(classes: Iterable[StatementClass]) -> str:
    """The most sensitive of `classes` (unknown > admin > ddl > write > pii > read > tx).
    Nothing at all (an empty query) counts as `tx`: it moves no data."""
    key = classes if isinstance(classes, frozenset) else frozenset(classes)
    return _SENSITIVITY[key]


# -- per-statement series: plain numbers, read at scrape time ------------------------------------
#
# prometheus_client takes a lock in every inc()/observe(); the relay counts and times every
# statement, so those series are plain attributes bumped by the event loop thread (the only
# thread that touches them) and turned into metric families when /metrics is scraped.


class _HotSeries:
    """The collector that exposes the Tally series as counters and histograms."""

    def __init__(self) -> None:
        self.created = time.time()
        self.counters: list[tuple[str, str, tuple[str, ...], dict[tuple[str, ...], Tally]]] = []
        self.histograms: list[tuple[str, str, TallyHistogram]] = []

    def counter(self, name: str, doc: str, labels: tuple[str, ...],
                values: Iterable[tuple[str, ...]]) -> dict[tuple[str, ...], Tally]:
        children = {v: Tally() for v in values}
        self.counters.append((name, doc, labels, children))
        return children

    def histogram(self, name: str, doc: str, bounds: Sequence[float]) -> TallyHistogram:
        h = TallyHistogram(bounds)
        self.histograms.append((name, doc, h))
        return h

    def describe(self) -> Iterator[Metric]:
        for name, doc, labels, _ in self.counters:
            yield CounterMetricFamily(name, doc, labels=list(labels))
        for name, doc, _h in self.histograms:
            yield HistogramMetricFamily(name, doc)

    def collect(self) -> Iterator[Metric]:
        for name, doc, labels, children in self.counters:
            fam = CounterMetricFamily(name, doc, labels=list(labels))
            for values, tally in children.items():
                fam.add_metric(list(values), tally.value, created=self.created)
            yield fam
        for name, doc, h in self.histograms:
            hfam = HistogramMetricFamily(name, doc)
            hfam.add_metric([], h.buckets(), h.sum)
            hfam.add_sample(name + "_created", {}, self.created)
            yield hfam


class Metrics:
    """pgguard's metrics, registered on `registry` together with process, platform and GC
    collectors (`process=False` leaves those out, e.g. for a second Metrics in one process)."""

    def __init__(self, registry: CollectorRegistry, *, process: bool = True) -> None:
        self.registry = registry
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

        self.client_connections = Gauge(
            "pgguard_client_connections", "Client connections open now.", registry=registry)

        # Per statement: lock-free, event loop thread only (see Tally).
        hot = _HotSeries()
        self.statements: dict[tuple[str, ...], Tally] = hot.counter(
            "pgguard_statements_total",
            "Statements decided, by decision and most sensitive class.",
            ("decision", "sensitivity"), [(d, s) for d in DECISIONS for s in SENSITIVITIES])
        self.statement_seconds = hot.histogram(
            "pgguard_statement_seconds",
            "Statement time end to end through pgguard (hold time excluded).",
            STATEMENT_BUCKETS)
        self.classify_seconds = hot.histogram(
            "pgguard_classify_seconds",
            "Time to classify one message that missed the cache (hits are not timed).",
            CLASSIFY_BUCKETS)
        cache = hot.counter("pgguard_classify_cache_total", "Classification cache lookups.",
                            ("result",), [(r,) for r in CLASSIFY_CACHE_RESULTS])
        self.classify_cache = {r[0]: tally for r, tally in cache.items()}
        registry.register(hot)

        self.holds_active = Gauge(
            "pgguard_holds_active", "Statements held waiting for step-up now.", registry=registry)
        hold = Histogram("pgguard_hold_seconds", "How long statements were held, by outcome.",
                         ["outcome"], buckets=HOLD_BUCKETS, registry=registry)
        self.hold_seconds = {o: hold.labels(outcome=o) for o in HOLD_OUTCOMES}

        stepup = Counter("pgguard_stepup_total", "Step-up attempts, by result.", ["result"],
                         registry=registry)
        self.stepup = {r: stepup.labels(result=r) for r in STEPUP_RESULTS}

        upstream = Counter("pgguard_upstream_errors_total", "Upstream failures, by kind.",
                           ["kind"], registry=registry)
        self.upstream_errors = {k: upstream.labels(kind=k) for k in UPSTREAM_ERROR_KINDS}

        reloads = Counter("pgguard_policy_reloads_total", "Policy reloads, by result.",
                          ["result"], registry=registry)
        self.policy_reloads = {r: reloads.labels(result=r) for r in RELOAD_RESULTS}

        self.audit_errors = Counter(
            "pgguard_audit_errors_total", "Failed audit trail writes.", registry=registry)

    def count_statement(self, decision: str, classes: Iterable[StatementClass]) -> None:
        """One statement decided: `decision` from DECISIONS; KeyError for anything else."""
        self.statement_tally(decision, classes).value += 1

    def statement_tally(self, decision: str, classes: Iterable[StatementClass]) -> Tally:
        """The statements_total child `count_statement(decision, classes)` bumps."""
        return self.statements[decision, _SENSITIVITY[classes if type(classes) is frozenset
                                                      else frozenset(classes)]]

    def exposition(self) -> bytes:
        """The Prometheus text format of everything in the registry."""
        return generate_latest(self.registry)
