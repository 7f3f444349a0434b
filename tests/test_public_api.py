"""The public surface: exports, lazy loading and small value types."""

from __future__ import annotations

import pytest

import aicortex
from aicortex import (
    AICortexError,
    Attempt,
    CortexTimeoutError,
    ModelNotFoundError,
    ServerError,
    StreamError,
    Timeout,
    ValidationError,
)


def test_all_is_sorted_and_lists_every_public_name() -> None:
    """__all__ stays sorted, and every name in it resolves."""
    names = [n for n in aicortex.__all__ if n != "__version__"]
    assert names == sorted(names)
    for name in aicortex.__all__:
        assert getattr(aicortex, name) is not None
    assert sorted(dir(aicortex)) == sorted(aicortex.__all__)


def test_the_design_contract_names_exist() -> None:
    """The names the design promises are importable from the package."""
    for name in (
        "AsyncCortex",
        "Cortex",
        "AsyncStream",
        "Stream",
        "StreamEvent",
        "EventType",
        "AICortexError",
        "ModelNotFoundError",
        "ServerError",
        "ValidationError",
        "StreamError",
        "chat",
        "families",
        "models",
        "model_info",
        "model_servers",
        "server_info",
        "build_api_request",
        "llm_params",
        "random_llm_params",
    ):
        assert name in aicortex.__all__


def test_unknown_attributes_raise_attribute_error() -> None:
    """A typo gets the usual AttributeError."""
    with pytest.raises(AttributeError, match="no attribute 'Cortx'"):
        _ = aicortex.Cortx  # type: ignore[attr-defined]


def test_every_error_is_an_aicortex_error_and_the_usual_builtin() -> None:
    """One except clause catches all; ValidationError is a ValueError, timeouts TimeoutError."""
    for cls in (ModelNotFoundError, ServerError, ValidationError, StreamError, CortexTimeoutError):
        assert issubclass(cls, AICortexError)
    assert issubclass(ValidationError, ValueError)
    assert issubclass(CortexTimeoutError, TimeoutError)


def test_error_messages_say_what_happened_and_what_to_do() -> None:
    """Messages carry the facts: model and matches, servers and reasons, the limit."""
    missing = ModelNotFoundError(
        "lama3", ["llama3.2:3b"], servers=["http://a:1"], not_pulled=["llama3:8b"]
    )
    assert str(missing) == (
        "Model 'lama3' was not found on http://a:1. Did you mean: 'llama3.2:3b', "
        "'llama3:8b' (not pulled)? To use it, pull it: `aicortex pull lama3 --server "
        "http://a:1`, or `ollama pull lama3` on that machine."
    )
    assert missing.suggestions == ["llama3.2:3b", "llama3:8b"]
    assert missing.not_pulled == ["llama3:8b"]
    no_match = ModelNotFoundError("zzz", servers=["http://a:1", "http://b:2"])
    assert no_match.suggestions == []
    assert no_match.hint == (
        "To use it, pull it: `aicortex pull zzz --server http://a:1 --server http://b:2`, "
        "or `ollama pull zzz` on those machines."
    )
    offline = ModelNotFoundError("lama3", ["llama3.2:3b"])
    assert str(offline) == "Model 'lama3' was not found. Did you mean: 'llama3.2:3b'?"
    down = ServerError("No server.", [Attempt("http://a:1", "connection refused")])
    assert str(down) == "No server. Tried: http://a:1: connection refused."
    assert down.servers == ["http://a:1"]
    late = CortexTimeoutError("first_token", 120, server="http://a:1")
    assert "120s" in str(late)
    assert "first_token=" in str(late)


@pytest.mark.parametrize(
    "kwargs",
    [{"connect": 0}, {"idle": -1}, {"probe": None}, {"total": "5"}, {"first_token": True}],
)
def test_timeouts_must_be_positive_numbers(kwargs: dict[str, object]) -> None:
    """A nonsensical limit is refused when the Timeout is made, naming the field."""
    (field,) = kwargs
    with pytest.raises(ValidationError, match=f"Timeout.{field}"):
        Timeout(**kwargs)  # type: ignore[arg-type]


def test_timeouts_have_sane_defaults() -> None:
    """Defaults: quick connect and probe, generous first token, no total deadline."""
    t = Timeout()
    assert (t.connect, t.first_token, t.idle, t.total, t.probe) == (5.0, 120.0, 60.0, None, 2.0)


def test_bad_client_settings_are_refused() -> None:
    """Wrong types for timeout or health_ttl raise ValidationError at construction."""
    with pytest.raises(ValidationError, match="timeout must be"):
        aicortex.AsyncCortex(timeout=30)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="health_ttl"):
        aicortex.AsyncCortex(health_ttl=-1)
