"""The public surface: ``tiercache.__all__`` and where its objects say they live."""

from __future__ import annotations

import importlib

import tiercache


def isort_order(name: str) -> tuple[int, str]:
    """The order ruff's RUF022 and isort use: CONSTANTS, then Classes, then functions."""
    kind = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return kind, name


def test_all_is_sorted_and_unique() -> None:
    assert tiercache.__all__ == sorted(tiercache.__all__, key=isort_order)
    assert len(set(tiercache.__all__)) == len(tiercache.__all__)


def test_every_public_name_is_importable() -> None:
    module = importlib.import_module("tiercache")
    for name in tiercache.__all__:
        assert hasattr(module, name), name
        exec(f"from tiercache import {name}", {})


def test_public_objects_live_in_tiercache() -> None:
    wrong = {
        name: getattr(getattr(tiercache, name), "__module__", None)
        for name in tiercache.__all__
        if getattr(getattr(tiercache, name), "__module__", None) != "tiercache"
    }
    assert wrong == {}


def test_expected_names_are_public() -> None:
    expected = {
        "MISSING",
        "BackendError",
        "CacheStats",
        "CodecError",
        "ConfigError",
        "KeyEncodingError",
        "MsgpackSerializer",
        "PickleSerializer",
        "TierCacheError",
        "TieredCache",
        "ValueTooLargeError",
        "tiered",
    }
    assert expected <= set(tiercache.__all__)


def test_exception_tree() -> None:
    from tiercache import (
        BackendError,
        CodecError,
        ConfigError,
        KeyEncodingError,
        TierCacheError,
        ValueTooLargeError,
    )

    assert issubclass(ConfigError, TierCacheError) and issubclass(ConfigError, ValueError)
    assert issubclass(KeyEncodingError, TierCacheError) and issubclass(KeyEncodingError, TypeError)
    assert issubclass(CodecError, TierCacheError) and issubclass(CodecError, ValueError)
    assert issubclass(ValueTooLargeError, CodecError)
    assert issubclass(BackendError, TierCacheError)
    assert not issubclass(BackendError, ValueError)


def test_version_is_a_string() -> None:
    assert isinstance(tiercache.__version__, str)
    assert tiercache.__version__.count(".") >= 1
