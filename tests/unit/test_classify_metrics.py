"""`ProxyContext.classify` counts cache hits and misses and times only the misses."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from pgguard.classify import SessionFacts
from pgguard.classify.gucs import guc_is_harmless
from pgguard.config import Config
from pgguard.observability.metrics import Metrics
from pgguard.proxy.cancel import LocalCancelRegistry
from pgguard.proxy.grants import GrantBook
from pgguard.proxy.guard import PolicyGuard
from pgguard.proxy.server import ProxyContext


def _ctx() -> ProxyContext:
    config = Config()
    return ProxyContext(config, PolicyGuard(lambda: config.policy, GrantBook()),
                        LocalCancelRegistry(), guc_is_harmless)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    v = registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_hits_and_misses_counted_and_only_misses_timed() -> None:
    registry = CollectorRegistry()
    ctx = _ctx()
    ctx.metrics = Metrics(registry, process=False)
    facts = SessionFacts()
    first = ctx.classify("select 1", facts, False)
    assert ctx.classify("select 1", facts, False) is first
    ctx.classify("select 1", facts, False)
    ctx.classify("select 2", facts, True)
    ctx.classify("select 2", facts, False)  # a Query and a Parse are different entries
    assert _value(registry, "pgguard_classify_cache_total", result="hit") == 2
    assert _value(registry, "pgguard_classify_cache_total", result="miss") == 3
    assert _value(registry, "pgguard_classify_seconds_count") == 3
    assert (ctx.classifier.hits, ctx.classifier.misses) == (2, 3)


def test_without_metrics_the_cache_still_counts() -> None:
    ctx = _ctx()
    assert ctx.metrics is None
    ctx.classify("select 1", SessionFacts(), False)
    ctx.classify("select 1", SessionFacts(), False)
    assert (ctx.classifier.hits, ctx.classifier.misses) == (1, 1)


def test_offloaded_classification_outdated_by_a_reload_is_done_again() -> None:
    """A reload while the worker classifies: its answer (old rules) is neither used nor cached;
    the statement is classified again under the new rules."""
    import asyncio

    from pgguard.classify import PiiRules, StatementClass

    ctx = _ctx()
    cache = ctx.classifier
    sql = "select email from public.users"
    facts = SessionFacts()

    async def run() -> object:
        task = asyncio.ensure_future(ctx.classify_offloaded(sql, facts, False, cache))
        await asyncio.sleep(0)  # the worker (a new process) is starting: seconds away
        cache.update(rules=PiiRules.from_config({"tables": {"public.users": ["email"]}}))
        try:
            return await task
        finally:
            ctx.close_pool()

    result = asyncio.run(run())
    assert StatementClass.PII in result.classes  # type: ignore[attr-defined]
    assert cache.lookup(sql, facts) is result
