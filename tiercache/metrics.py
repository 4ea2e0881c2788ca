"""Export ``cache.stats()`` to Prometheus or OpenTelemetry (optional extras, imported lazily).

Prometheus (``pip install tiercache[prometheus]``)::

    from prometheus_client import REGISTRY
    from tiercache.metrics import PrometheusCollector
    REGISTRY.register(PrometheusCollector(cache))

exposes ``tiercache_l1_hits_total{namespace="..."}`` and the other counters, and gauges such as
``tiercache_l1_entries``; several caches can share one collector (``PrometheusCollector(a, b)``).

OpenTelemetry (``pip install tiercache[opentelemetry]``)::

    from tiercache.metrics import instrument_opentelemetry
    instrument_opentelemetry(cache)            # the global MeterProvider, or meter_provider=...

registers observable counters ``tiercache.l1_hits`` ... and gauges, read from ``stats()``
at each collection, with the attribute ``tiercache.namespace``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from ._cache import TieredCache
from ._metrics import STATS_FIELDS, CacheStats

__all__ = ["COUNTERS", "GAUGES", "PrometheusCollector", "instrument_opentelemetry"]

#: stats() fields that only grow, with their help text (from CacheStats' definition).
COUNTERS: dict[str, str] = {f.name: f.metadata["help"] for f in STATS_FIELDS if f.metadata["kind"] == "counter"}
#: stats() fields that go up and down.
GAUGES: dict[str, str] = {f.name: f.metadata["help"] for f in STATS_FIELDS if f.metadata["kind"] == "gauge"}
#: Exported names that differ from the field's.
_GAUGE_NAMES = {f.name: f.metadata["metric"] for f in STATS_FIELDS if f.metadata["metric"]}


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{module} is not installed: pip install 'tiercache[{extra}]' to export tiercache metrics"
        ) from exc


def _value(stats: CacheStats, field: str) -> float:
    value = getattr(stats, field)
    return float(bool(value)) if field == "bus_connected" else float(value)


class PrometheusCollector:
    """A ``prometheus_client`` collector of one or more caches' ``stats()``, labelled by namespace."""

    def __init__(self, *caches: TieredCache, prefix: str = "tiercache") -> None:
        self._metrics = _require("prometheus_client.core", "prometheus")
        if not caches:
            raise ValueError("PrometheusCollector needs at least one TieredCache")
        self._caches = caches
        self._prefix = prefix

    def describe(self) -> Iterator[Any]:
        return iter(())  # collected on demand: nothing to describe ahead of time

    def collect(self) -> Iterator[Any]:
        m = self._metrics
        snapshots = [(cache.namespace, cache.stats()) for cache in self._caches]
        for field, help_text in COUNTERS.items():
            family = m.CounterMetricFamily(f"{self._prefix}_{field}", help_text, labels=["namespace"])
            for namespace, stats in snapshots:
                family.add_metric([namespace], _value(stats, field))
            yield family
        for field, help_text in GAUGES.items():
            name = _GAUGE_NAMES.get(field, field)
            family = m.GaugeMetricFamily(f"{self._prefix}_{name}", help_text, labels=["namespace"])
            for namespace, stats in snapshots:
                if getattr(stats, field) is not None:  # bus_connected: None without a bus
                    family.add_metric([namespace], _value(stats, field))
            yield family


def instrument_opentelemetry(*caches: TieredCache, meter_provider: Any = None) -> list[Any]:
    """Register observable instruments reading the caches' ``stats()``; returns them."""
    otel = _require("opentelemetry.metrics", "opentelemetry")
    if not caches:
        raise ValueError("instrument_opentelemetry needs at least one TieredCache")
    meter = otel.get_meter("tiercache", meter_provider=meter_provider)

    def reader(field: str) -> Any:
        def observe(options: Any) -> list[Any]:
            observations = []
            for cache in caches:
                stats = cache.stats()
                if getattr(stats, field) is not None:  # bus_connected: None without a bus
                    observations.append(
                        otel.Observation(_value(stats, field), {"tiercache.namespace": cache.namespace})
                    )
            return observations

        return observe

    instruments = [
        meter.create_observable_counter(f"tiercache.{field}", callbacks=[reader(field)], description=text)
        for field, text in COUNTERS.items()
    ]
    instruments += [
        meter.create_observable_gauge(
            f"tiercache.{_GAUGE_NAMES.get(field, field)}", callbacks=[reader(field)], description=text
        )
        for field, text in GAUGES.items()
    ]
    return instruments
