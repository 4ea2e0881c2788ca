"""Keys for request bodies (``json_key``, ``llm_key``, ``normalize_json``) and the metrics
exporters (``PrometheusCollector``, ``instrument_opentelemetry``)."""

from __future__ import annotations

import math
import sys
from typing import Any

import prometheus_client
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tiercache import KeyEncodingError, TieredCache, json_key, llm_key, tiered
from tiercache._keys import normalize_json
from tiercache.metrics import COUNTERS, GAUGES, PrometheusCollector, instrument_opentelemetry

# -- json_key ---------------------------------------------------------------------------------


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values, written independently of the library: objects by their members
    (order aside), arrays element by element, numbers by value (``1 == 1.0``, ``-0.0 == 0``),
    and booleans, strings and null only equal to their own kind."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if a is None or b is None:
        return a is b
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    return False


def strictly_equal(a: Any, b: Any) -> bool:
    """``==`` that also requires equal types all the way down (Python's ``True == 1`` does not)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(strictly_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strictly_equal(a[k], b[k]) for k in a)
    return bool(a == b)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, 1, -1, 0.0, -0.0, 1.0, 2.5, 2**53, float(2**53), "", "1", "{}", "true", "null"])
    | st.text(max_size=4)
)
KEYS = st.text(max_size=3) | st.sampled_from(["{}", "a", "b"])
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)


def variant(value: Any, draw: Any) -> Any:
    """An equal JSON value spelled differently: members reordered, whole numbers as floats or
    ints, arrays as tuples."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return float(value) if abs(value) < 2**53 and draw(st.booleans()) else value
    if isinstance(value, float):
        return int(value) if value.is_integer() and draw(st.booleans()) else value
    if isinstance(value, list):
        items = [variant(v, draw) for v in value]
        return tuple(items) if draw(st.booleans()) else items
    items = [(k, variant(v, draw)) for k, v in value.items()]
    return dict(draw(st.permutations(items)))


@settings(max_examples=300, deadline=None)
@given(a=JSON, b=JSON)
@example(a=True, b=1)
@example(a=[1, 2], b=[2, 1])
@example(a={"x": "1"}, b={"x": 1})
@example(a=[[1], 2], b=[1, [2]])
def test_json_keys_are_equal_exactly_for_equal_json(a: Any, b: Any) -> None:
    # (an object against an array spelling its normal form: test_json_key_never_confuses_...)
    assert (json_key(a) == json_key(b)) == json_equal(a, b), (a, b)


@settings(max_examples=300, deadline=None)
@given(a=JSON, b=JSON)
@example(a=True, b=1)
@example(a=1, b=1.0)
def test_normalized_forms_are_equal_exactly_when_keys_are(a: Any, b: Any) -> None:
    assert strictly_equal(normalize_json(a), normalize_json(b)) == (json_key(a) == json_key(b)), (a, b)


@settings(max_examples=200, deadline=None)
@given(value=JSON, data=st.data())
def test_equal_json_spelled_differently_has_the_same_key(value: Any, data: Any) -> None:
    other = variant(value, data.draw)
    assert json_equal(value, other)
    assert json_key(other) == json_key(value)


def test_json_key_examples() -> None:
    assert json_key({"q": "cats", "k": 10}) == json_key({"k": 10.0, "q": "cats"})
    assert json_key({"a": {"b": [1, 2.0]}}) == json_key({"a": {"b": (1.0, 2)}})
    assert json_key(-0.0) == json_key(0)
    assert json_key(2**64) == json_key(float(2**64))
    distinct = ["1", 1, True, None, [1], {"1": 1}, [1, 2], [2, 1], [[1, 2]], 1.5, "", [], {}, False, 0]
    keys = [json_key(v) for v in distinct]
    assert len(set(keys)) == len(distinct)
    assert all(k.startswith("json:") and len(k) == 5 + 32 for k in keys)


def test_json_key_never_confuses_an_object_with_an_array() -> None:
    """``{"a": 1}`` and ``["{}", [["a", 1]]]`` are different JSON values; both normalise to
    ``("{}", (("a", 1),))`` today, so they share a key (a cache answers one with the other)."""
    assert json_key({"a": 1}) != json_key(["{}", [["a", 1]]])
    assert json_key({}) != json_key(["{}", []])
    assert llm_key("m", [{"role": "user", "content": {"a": 1}}]) != llm_key(
        "m", [{"role": "user", "content": ["{}", [["a", 1]]]}]
    )


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (math.nan, "request is nan"),
        ({"a": [1, math.inf]}, "request['a'][1] is inf"),
        ({"a": {"b": -math.inf}}, "request['a']['b'] is -inf"),
        ({"a": {1: 2}}, "request['a'] has a non-string key 1"),
        ({("x",): 1}, "request has a non-string key ('x',)"),
        ({None: 1}, "request has a non-string key None"),
        ([b"bytes"], "request[0] is a bytes"),
        ({"s": {1, 2}}, "request['s'] is a set"),
        ([object()], "request[0] is a object"),
    ],
)
def test_json_key_refuses_what_json_cannot_hold_naming_where(value: Any, where: str) -> None:
    with pytest.raises(KeyEncodingError) as info:
        json_key(value)
    assert where in str(info.value)


# -- llm_key ------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_llm_key_ignores_what_does_not_change_the_answer() -> None:
    base = llm_key("gpt-x", MESSAGES, temperature=0, max_tokens=100)
    reordered = [{"content": m["content"], "role": m["role"]} for m in MESSAGES]
    assert llm_key("gpt-x", reordered, max_tokens=100, temperature=0.0) == base
    assert (
        llm_key(
            "gpt-x",
            MESSAGES,
            temperature=0,
            max_tokens=100.0,
            stream=True,
            stream_options={"include_usage": True},
            user="u-42",
            timeout=30,
            request_timeout=5,
            extra_headers={"x": "y"},
            metadata={"trace": "abc"},
            top_p=None,
            seed=None,
        )
        == base
    )


def test_llm_key_differs_for_what_changes_the_answer() -> None:
    base = llm_key("gpt-x", MESSAGES, temperature=0)
    others = [
        llm_key("gpt-y", MESSAGES, temperature=0),
        llm_key("gpt-x", MESSAGES, temperature=0.7),
        llm_key("gpt-x", MESSAGES),  # the provider's default temperature is not 0
        llm_key("gpt-x", MESSAGES, temperature=0, seed=1),
        llm_key("gpt-x", MESSAGES, temperature=0, tools=[{"type": "function", "function": {"name": "f"}}]),
        llm_key("gpt-x", [*MESSAGES, {"role": "user", "content": "more"}], temperature=0),
        llm_key("gpt-x", list(reversed(MESSAGES)), temperature=0),  # message order matters
        llm_key("gpt-x", [{"role": "user", "content": "hi"}], temperature=0),
        llm_key("gpt-x", [{"role": "assistant", "content": "be brief"}, MESSAGES[1]], temperature=0),
        llm_key("gpt-x", MESSAGES, temperature=0, response_format={"type": "json_object"}),
    ]
    assert base.startswith("llm:")
    assert len({base, *others}) == len(others) + 1


def test_llm_key_checks_its_arguments() -> None:
    for model in ("", None, 3):
        with pytest.raises(KeyEncodingError, match="model"):
            llm_key(model, MESSAGES)  # type: ignore[arg-type]
    with pytest.raises(KeyEncodingError, match="nan"):
        llm_key("m", MESSAGES, temperature=math.nan)
    with pytest.raises(KeyEncodingError, match=r"\['messages'\]\[0\]"):
        llm_key("m", [object()])


def test_request_keys_as_cache_keys() -> None:
    """A ``str`` from ``key=`` is a user key: two functions keyed by the same request share an entry."""
    cache = TieredCache(namespace="req")
    calls: list[Any] = []

    @tiered(cache, key=json_key)
    def search(body: dict[str, Any]) -> list[str]:
        calls.append(body)
        return ["result"]

    assert search({"q": "cats", "k": 10}) == ["result"]
    assert search({"k": 10.0, "q": "cats"}) == ["result"]
    assert len(calls) == 1
    assert cache.get(json_key({"q": "cats", "k": 10})) == ["result"]

    @tiered(cache, key=json_key)
    def other(body: dict[str, Any]) -> str:
        calls.append(body)
        return "other"

    assert other({"q": "cats", "k": 10}) == ["result"]  # search's entry: prefix the key to keep them apart
    assert len(calls) == 1


# -- Prometheus -----------------------------------------------------------------------------------


def make_traffic(cache: TieredCache, misses: int, hits: int) -> None:
    @tiered(cache, name="traffic")
    def f(x: int) -> int:
        return x

    for i in range(misses):
        f(i)
    for _ in range(hits):
        f(0)


def test_prometheus_collector_exports_the_stats() -> None:
    registry = prometheus_client.CollectorRegistry()
    a, b = TieredCache(namespace="prom-a"), TieredCache(namespace="prom-b")
    registry.register(PrometheusCollector(a, b))

    def sample(name: str, namespace: str) -> float | None:
        return registry.get_sample_value(name, {"namespace": namespace})  # type: ignore[no-any-return]

    assert sample("tiercache_l1_hits_total", "prom-a") == 0.0
    make_traffic(a, misses=3, hits=5)
    make_traffic(b, misses=1, hits=0)
    assert sample("tiercache_l1_hits_total", "prom-a") == 5.0
    assert sample("tiercache_misses_total", "prom-a") == 3.0
    assert sample("tiercache_loads_total", "prom-a") == 3.0
    assert sample("tiercache_l1_entries", "prom-a") == 3.0
    assert sample("tiercache_l1_bytes", "prom-a") == float(a.stats().l1_bytes)
    assert sample("tiercache_bus_connected", "prom-a") is None  # L1 only: no bus, no series
    assert sample("tiercache_misses_total", "prom-b") == 1.0
    assert sample("tiercache_l1_hits_total", "prom-b") == 0.0
    for field in COUNTERS:
        assert sample(f"tiercache_{field}_total", "prom-a") is not None, field
    for field in GAUGES.keys() - {"bus_connected"}:
        name = "l1_entries" if field == "l1_size" else field
        assert sample(f"tiercache_{name}", "prom-a") is not None, field
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE tiercache_l1_hits_total counter" in text
    assert 'tiercache_l1_hits_total{namespace="prom-a"} 5.0' in text
    assert "# TYPE tiercache_l1_entries gauge" in text


def test_prometheus_collector_prefix_and_arguments() -> None:
    registry = prometheus_client.CollectorRegistry()
    cache = TieredCache(namespace="prom")
    registry.register(PrometheusCollector(cache, prefix="myapp_cache"))
    make_traffic(cache, misses=2, hits=1)
    assert registry.get_sample_value("myapp_cache_l1_hits_total", {"namespace": "prom"}) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        PrometheusCollector()


# -- OpenTelemetry --------------------------------------------------------------------------------


def otel_points(reader: Any) -> dict[tuple[str, str], float]:
    """``(instrument name, namespace) -> value`` from one collection."""
    points: dict[tuple[str, str], float] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    points[(metric.name, point.attributes["tiercache.namespace"])] = point.value
    return points


def test_opentelemetry_instruments_read_the_stats() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        a, b = TieredCache(namespace="otel-a"), TieredCache(namespace="otel-b")
        instruments = instrument_opentelemetry(a, b, meter_provider=provider)
        assert len(instruments) == len(COUNTERS) + len(GAUGES)
        make_traffic(a, misses=2, hits=4)
        points = otel_points(reader)
        assert points[("tiercache.l1_hits", "otel-a")] == 4
        assert points[("tiercache.misses", "otel-a")] == 2
        assert points[("tiercache.l1_entries", "otel-a")] == 2
        assert points[("tiercache.l1_hits", "otel-b")] == 0
        assert ("tiercache.bus_connected", "otel-a") not in points  # L1 only: no bus
        make_traffic(a, misses=0, hits=3)
        assert otel_points(reader)[("tiercache.l1_hits", "otel-a")] == 7  # cumulative, read at each collection
        names = {name for name, _ in points}
        assert {f"tiercache.{f}" for f in COUNTERS} <= names
        with pytest.raises(ValueError, match="at least one"):
            instrument_opentelemetry(meter_provider=provider)
    finally:
        provider.shutdown()


# -- missing extras -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "extra", "make"),
    [
        ("prometheus_client.core", "prometheus", PrometheusCollector),
        ("prometheus_client", "prometheus", PrometheusCollector),
        ("opentelemetry.metrics", "opentelemetry", instrument_opentelemetry),
    ],
)
def test_a_missing_extra_is_named_in_the_import_error(
    monkeypatch: pytest.MonkeyPatch, module: str, extra: str, make: Any
) -> None:
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # "import module" now raises ImportError
    with pytest.raises(ImportError) as info:
        make(TieredCache(namespace="noextra"))
    message = str(info.value)
    assert f"tiercache[{extra}]" in message
    assert "pip install" in message
