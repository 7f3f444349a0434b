"""Health cache and candidate ordering: pure rules, time passed in."""

from __future__ import annotations

from aicortex._health import Health, HealthCache, ServerInfo, decided, plan_attempts, unique

A, B, C = "http://a:1", "http://b:1", "http://c:1"


def up(url: str, *models: str, at: float = 0.0) -> Health:
    return Health.ok(url, checked_at=at, latency=0.01, version="0.33.0", models=models)


def test_entries_are_fresh_until_the_ttl_passes() -> None:
    """A probe result is reused within the TTL and dropped after it."""
    cache = HealthCache(ttl=60)
    cache.put(up(A, at=100.0))
    assert cache.get(A, 159.9) is not None
    assert cache.get(A, 160.0) is None
    assert cache.stale([A, B], 120.0) == [B]


def test_a_failed_request_marks_the_server_down_at_once() -> None:
    """mark_down replaces a healthy entry with a down one carrying the reason."""
    cache = HealthCache(ttl=60)
    cache.put(up(A, at=0.0))
    cache.mark_down(A, "connection refused", now=1.0)
    entry = cache.get(A, 2.0)
    assert entry is not None
    assert not entry.up
    assert entry.error == "connection refused"


def test_servers_with_the_model_come_first_in_preference_order() -> None:
    """Healthy servers listing the model lead; others follow; down ones are skipped."""
    health = {
        A: up(A, "qwen2.5:7b"),
        B: up(B, "llama3.2:3b"),
        C: Health.down(C, "connection refused", checked_at=0.0),
    }
    plan = plan_attempts([C, A, B], health, "llama3.2:3b")
    assert plan.order == [B, A]
    assert [(s.server, s.reason) for s in plan.skipped] == [(C, "connection refused")]


def test_model_names_match_with_the_default_tag() -> None:
    """`llama3.2` matches a server listing `llama3.2:latest`."""
    assert up(A, "llama3.2:latest").has_model("llama3.2")
    assert not up(A, "llama3.2:1b").has_model("llama3.2")


def test_unprobed_servers_are_skipped_with_a_reason() -> None:
    """A server whose probe never finished is not tried blind."""
    plan = plan_attempts([A, B], {B: up(B)}, None)
    assert plan.order == [B]
    assert plan.skipped[0].reason == "not probed"


def test_the_choice_is_settled_once_every_earlier_server_is_known() -> None:
    """Probing can stop when the best-ranked server with the model is known up."""
    assert decided([A, B], {A: up(A, "m")}, "m")
    assert not decided([A, B], {B: up(B, "m")}, "m")
    assert decided([A, B], {A: Health.down(A, "x", checked_at=0), B: up(B, "m")}, "m")
    assert not decided([A, B], {A: up(A, "other"), B: up(B, "other")}, "m")


def test_server_info_reports_whether_the_model_is_present() -> None:
    """ServerInfo.has_model is None when the server is down or no model was asked."""
    assert ServerInfo.from_health(up(A, "m"), "m").has_model is True
    assert ServerInfo.from_health(up(A, "m"), "x").has_model is False
    assert ServerInfo.from_health(up(A, "m")).has_model is None
    assert ServerInfo.from_health(Health.down(A, "x", checked_at=0), "m").has_model is None


def test_unique_keeps_first_occurrences() -> None:
    """Duplicate servers collapse to their first position."""
    assert unique([B, A, B, C, A]) == [B, A, C]
