"""Routing and server health as a state machine: pure rules, time passed in, no network."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from aicortex import Server, ValidationError
from aicortex._health import Health, ServerInfo, unique
from aicortex._protocol import model_key
from aicortex._routing import (
    BUSY,
    DOWN,
    FULL,
    MODEL,
    Breaker,
    Ejection,
    Fleet,
    backoff,
    rendezvous,
    routing_choice,
)

A, B, C, D = "http://a:1", "http://b:1", "http://c:1", "http://d:1"
M = model_key("llama3.2:3b")
OTHER = model_key("qwen2.5:7b")


def probed(
    fleet: Fleet,
    url: str,
    *models: str,
    at: float = 0.0,
    latency: float = 0.01,
    loaded: tuple[str, ...] | None = None,
) -> list[str]:
    names = models or ("llama3.2:3b",)
    return fleet.probed(
        url,
        at,
        latency=latency,
        version="0.9.0",
        models=names,
        keys=frozenset(model_key(n) for n in names),
        loaded=None if loaded is None else frozenset(model_key(n) for n in loaded),
    )


def fleet_of(*urls: str, ttl: float = 60.0, servers: tuple[Server, ...] = ()) -> Fleet:
    fleet = Fleet(ttl, servers)
    for url in urls:
        probed(fleet, url)
    return fleet


# -- the breaker ---------------------------------------------------------------


def test_ejection_time_doubles_from_one_second_up_to_thirty() -> None:
    """1 s, 2 s, 4 s ... capped at 30 s."""
    assert [backoff(1.0, 30.0, n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff(0.5, 8.0, 1) == 0.5
    assert backoff(0.5, 8.0, 10) == 8.0
    assert backoff(1.0, 30.0, 10_000) == 30.0


def test_three_failures_in_a_row_eject_and_a_success_resets_the_count() -> None:
    breaker = Breaker()
    assert not breaker.fail(0.0, "HTTP 502")
    assert not breaker.fail(0.0, "HTTP 502")
    breaker.succeed()
    assert not breaker.fail(1.0, "HTTP 502")
    assert not breaker.fail(1.0, "HTTP 502")
    assert breaker.fail(1.0, "HTTP 502")
    assert breaker.until == 2.0


def test_after_an_ejection_one_failure_ejects_again_for_twice_as_long() -> None:
    breaker = Breaker()
    assert breaker.fail(10.0, "refused", at_once=True)
    assert breaker.until == 11.0
    assert breaker.fail(11.5, "HTTP 502")  # back on trial: one is enough
    assert breaker.until == 13.5
    breaker.succeed()
    assert breaker.ejections == 0
    assert not breaker.fail(20.0, "HTTP 502")


# -- server states ---------------------------------------------------------------


def test_a_connection_failure_ejects_the_server_at_once() -> None:
    fleet = fleet_of(A, B)
    assert fleet.failed(A, "unreachable", "connection refused", 5.0)
    assert fleet.pick([A, B], M, 5.0) == B
    assert fleet.snapshot(A, 5.0).state == "ejected"
    assert fleet.snapshot(A, 5.0).retry_in == 1.0
    assert fleet.snapshot(A, 5.0).error == "connection refused"


def test_other_server_failures_eject_after_three_in_a_row() -> None:
    fleet = fleet_of(A, B)
    for _ in range(2):
        assert not fleet.failed(A, "failed", "HTTP 502", 0.0)
        assert fleet.pick([A, B], M, 0.0) == A
    assert fleet.failed(A, "failed", "HTTP 502", 0.0)
    assert fleet.pick([A, B], M, 0.0) == B


def test_the_ejection_rules_can_be_set() -> None:
    """One failure ejects, for 2 s, doubling up to 5 s; a model on a server that works
    follows the same rules."""
    fleet = Fleet(60.0, (), Ejection(failures=1, first=2.0, max=5.0))
    for url in (A, B):
        probed(fleet, url)
    assert fleet.failed(A, "failed", "HTTP 502", 0.0)
    assert fleet.hold(A, M, 0.0) == (DOWN, 2.0)
    assert fleet.node(A).breaker.fail(10.0, "again", policy=fleet.ejection)
    assert fleet.node(A).breaker.until == 14.0
    assert fleet.node(A).breaker.fail(20.0, "again", policy=fleet.ejection)
    assert fleet.node(A).breaker.until == 25.0  # 8 s, capped at 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"failures": 0}, "Ejection.failures must be a whole number >= 1"),
        ({"first": 0}, "Ejection.first must be a positive number"),
        ({"max": "30"}, "Ejection.max must be a positive number"),
        ({"first": 10, "max": 5}, "must not be shorter than Ejection.first"),
    ],
)
def test_bad_ejection_rules_are_refused(args: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Ejection(**args)  # type: ignore[arg-type]


def test_when_the_ejection_ends_the_server_is_probed_alongside_not_before() -> None:
    """A request never waits on a server that may still be dead: it goes elsewhere while
    the probe runs, and the server gets traffic only once the probe answered."""
    fleet = fleet_of(A, B)
    fleet.failed(A, "unreachable", "connection refused", 0.0)
    assert fleet.to_probe([A, B], 0.5) == ([], [])  # still ejected: nobody probes it
    assert fleet.to_probe([A, B], 1.0) == ([], [A])
    assert fleet.pick([A, B], M, 1.0) == B  # not before the probe answers
    assert fleet.hold(A, M, 1.0)[0] == DOWN
    probed(fleet, A, at=1.01)
    assert fleet.pick([A, B], M, 1.02) == A
    assert fleet.snapshot(A, 1.02).state == "healthy"


def test_a_failed_probe_ejects_again_with_the_next_backoff() -> None:
    fleet = fleet_of(A)
    fleet.failed(A, "unreachable", "refused", 0.0)
    fleet.failed(A, "unreachable", "probe: refused", 1.0)
    assert fleet.snapshot(A, 1.0).retry_in == 2.0
    fleet.failed(A, "unreachable", "probe: refused", 3.0)
    assert fleet.snapshot(A, 3.0).retry_in == 4.0


def test_a_broken_answer_counts_against_the_model_and_makes_the_server_suspect() -> None:
    """Attribution: the next request probes the server first; if it answers, only that
    model's count grows, and other models keep using the server."""
    fleet = fleet_of(A)
    assert not fleet.failed(A, "model", "broke after 3 tokens", 0.0, M, "llama3.2:3b")
    assert fleet.to_probe([A], 0.1) == ([A], [])
    assert fleet.pick([A], OTHER, 0.1) is None  # not until the probe answered
    probed(fleet, A, "llama3.2:3b", "qwen2.5:7b", at=0.2)
    assert fleet.pick([A], OTHER, 0.3) == A
    assert fleet.pick([A], M, 0.3) == A  # one failure is not an ejection


def test_three_broken_answers_eject_the_pair_only() -> None:
    fleet = fleet_of(A, B)
    for i in range(3):
        assert not fleet.failed(A, "model", "the model crashed", float(i), M, "llama3.2:3b")
        ejected = probed(fleet, A, "llama3.2:3b", "qwen2.5:7b", at=float(i))
    assert ejected == ["llama3.2:3b"]
    assert fleet.pick([A, B], M, 2.5) == B
    assert fleet.pick([A, B], OTHER, 2.5) == A
    state = fleet.snapshot(A, 2.5)
    assert state.state == "healthy"
    assert state.ejected_models == {"llama3.2:3b": 0.5}
    assert fleet.hold(A, M, 2.5) == (MODEL, 3.0)
    assert fleet.pick([A, B], M, 3.0) == A  # the pair's ejection is over
    fleet.served(A, M)
    assert fleet.snapshot(A, 3.0).ejected_models == {}
    assert not fleet.node(A).pairs


def test_broken_answers_count_against_the_model_only_once_a_probe_answers() -> None:
    """A server killed under load breaks every stream it had: those count against the
    server (its probe fails), not against its models."""
    fleet = fleet_of(A)
    for _ in range(30):
        fleet.failed(A, "model", "connection dropped", 0.0, M, "llama3.2:3b")
    assert fleet.failed(A, "unreachable", "probe: connection refused", 0.0)
    assert probed(fleet, A, at=1.5) == []
    assert fleet.node(A).pairs == {}
    assert fleet.pick([A], M, 1.5) == A


def test_failures_while_ejected_do_not_stretch_the_ejection() -> None:
    """Many requests that were under way when a server died fail at once: one ejection
    of one second, not thirty ejections in a row."""
    fleet = fleet_of(A)
    for _ in range(30):
        fleet.failed(A, "unreachable", "connection refused", 0.0)
    assert fleet.node(A).breaker.ejections == 1
    assert fleet.snapshot(A, 0.0).retry_in == 1.0
    fleet.node(A).pending = [(M, "llama3.2:3b", "x")] * 30
    assert probed(fleet, A, at=2.0) == ["llama3.2:3b"]
    assert fleet.node(A).pairs[M].ejections == 1


def test_busy_backs_off_from_half_a_second_to_eight() -> None:
    fleet = fleet_of(A, B)
    fleet.failed(A, "busy", "busy (HTTP 503)", 0.0)
    assert fleet.pick([A, B], M, 0.1) == B
    assert fleet.hold(A, M, 0.1) == (BUSY, 0.5)
    assert fleet.snapshot(A, 0.1).state == "busy"
    for _ in range(6):
        fleet.failed(A, "busy", "busy (HTTP 503)", 0.0)
    assert fleet.node(A).busy_until == 8.0
    fleet.answered(A)
    assert fleet.pick([A, B], M, 0.1) == A
    assert fleet.node(A).busy_times == 0


def test_busy_is_not_down() -> None:
    """503s never eject a server, however many."""
    fleet = fleet_of(A)
    for _ in range(10):
        assert not fleet.failed(A, "busy", "busy", 0.0)
    assert fleet.node(A).breaker.ejections == 0


def test_probe_results_go_stale_after_the_ttl() -> None:
    fleet = fleet_of(A, B, ttl=60.0)
    assert fleet.to_probe([A, B], 59.9) == ([], [])
    assert fleet.to_probe([A, B], 60.0) == ([A, B], [])
    assert fleet.to_probe(["http://new:1"], 0.0) == (["http://new:1"], [])


def test_probing_can_stop_once_the_first_choice_is_settled() -> None:
    """In priority order, a usable server with the model settles the pick once every
    server before it is known; a strategy that weighs all needs all."""
    fleet = Fleet(60.0)
    probed(fleet, A)
    fleet.node(B)
    assert fleet.settled([A, B], M, 0.0, "priority", spread=False)
    assert not fleet.settled([B, A], M, 0.0, "priority", spread=False)
    assert not fleet.settled([A, B], M, 0.0, "least_busy", spread=True)
    fleet.failed(B, "unreachable", "refused", 0.0)
    assert fleet.settled([B, A], M, 0.0, "priority", spread=False)
    assert fleet.settled([A, B], M, 0.0, "least_busy", spread=True)
    probed(fleet, C, "other:1b")
    assert not fleet.settled([C, "http://x:1"], M, 0.0, "priority", spread=False)


# -- strategies ------------------------------------------------------------------


def test_priority_takes_the_first_usable_server_that_lists_the_model() -> None:
    fleet = fleet_of(A, B)
    probed(fleet, C, "qwen2.5:7b")
    assert fleet.pick([C, A, B], M, 0.0) == A
    assert fleet.pick([C], M, 0.0) == C  # listing no match is a last resort, not a refusal
    fleet.failed(A, "unreachable", "refused", 0.0)
    assert fleet.pick([C, A, B], M, 0.0) == B


def test_max_concurrency_spills_to_the_next_choice() -> None:
    fleet = fleet_of(A, B, servers=(Server(A, max_concurrency=2),))
    fleet.node(A).inflight = 2
    assert fleet.pick([A, B], M, 0.0) == B
    assert fleet.hold(A, M, 0.0) == (FULL, 0.0)
    assert fleet.snapshot(A, 0.0).max_concurrency == 2
    fleet.node(A).inflight = 1
    assert fleet.pick([A, B], M, 0.0) == A


def test_least_busy_weighs_requests_in_flight_by_weight() -> None:
    fleet = fleet_of(A, B, C, servers=(Server(B, weight=2.0),))
    fleet.node(A).inflight = 3
    fleet.node(B).inflight = 4  # 2 per unit of weight
    fleet.node(C).inflight = 3
    assert fleet.pick([A, B, C], M, 0.0, "least_busy") == B


def test_least_busy_ties_go_to_the_loaded_model_then_the_lowest_latency() -> None:
    fleet = Fleet(60.0)
    probed(fleet, A, latency=0.001)
    probed(fleet, B, latency=0.050, loaded=("llama3.2:3b",))
    probed(fleet, C, latency=0.010)
    assert fleet.pick([A, B, C], M, 0.0, "least_busy") == B
    fleet.node(B).inflight = 1
    assert fleet.pick([A, B, C], M, 0.0, "least_busy") == A


def test_least_busy_spreads_a_steady_load_evenly() -> None:
    fleet = fleet_of(A, B, C, D)
    counts: Counter[str] = Counter()
    live: list[str] = []
    for i in range(2000):
        url = fleet.pick([A, B, C, D], M, 0.0, "least_busy")
        assert url is not None
        fleet.node(url).inflight += 1
        live.append(url)
        counts[url] += 1
        if len(live) > 200 or i % 7 == 0:  # some finish, in arrival order
            fleet.node(live.pop(0)).inflight -= 1
    assert all(abs(n - 500) <= 75 for n in counts.values()), counts


def test_round_robin_takes_turns_and_honours_weights() -> None:
    fleet = fleet_of(A, B, C)
    picks = [fleet.pick([A, B, C], M, 0.0, "round_robin") for _ in range(6)]
    assert Counter(picks) == {A: 2, B: 2, C: 2}
    assert picks[0] != picks[1] != picks[2]
    weighted = fleet_of(A, B, servers=(Server(A, weight=3.0),))
    picks = [weighted.pick([A, B], M, 0.0, "round_robin") for _ in range(8)]
    assert Counter(picks) == {A: 6, B: 2}
    assert picks[:4].count(B) == 1  # smooth: B is not left to the end


def test_every_strategy_passes_over_held_servers() -> None:
    fleet = fleet_of(A, B)
    fleet.failed(A, "unreachable", "refused", 0.0)
    for strategy in ("priority", "least_busy", "round_robin"):
        assert fleet.pick([A, B], M, 0.0, strategy) == B
    fleet.failed(B, "busy", "busy", 0.0)
    for strategy in ("priority", "least_busy", "round_robin"):
        assert fleet.pick([A, B], M, 0.0, strategy) is None


# -- affinity --------------------------------------------------------------------


def test_rendezvous_ranking_is_a_pure_function_of_the_key_and_the_set() -> None:
    weights = {A: 1.0, B: 1.0, C: 1.0, D: 1.0}
    assert rendezvous("conversation-42", weights) == rendezvous("conversation-42", dict(weights))
    assert sorted(rendezvous("k", weights)) == sorted(weights)
    # Every key keeps its first choice when some other server leaves.
    for i in range(200):
        key = f"user-{i}"
        first = rendezvous(key, weights)[0]
        fewer = {u: w for u, w in weights.items() if u != (D if first != D else C)}
        assert rendezvous(key, fewer)[0] == first


def test_keys_spread_over_the_servers_by_weight() -> None:
    counts = Counter(rendezvous(f"k{i}", {A: 1.0, B: 1.0, C: 2.0})[0] for i in range(4000))
    assert 800 <= counts[A] <= 1200
    assert 800 <= counts[B] <= 1200
    assert 1800 <= counts[C] <= 2200


def test_affinity_sticks_to_one_server_and_moves_only_when_it_is_held() -> None:
    fleet = fleet_of(A, B, C, D)
    first = fleet.pick([A, B, C, D], M, 0.0, "least_busy", "conversation-42")
    assert first is not None
    fleet.node(first).inflight = 50  # load does not move a key
    assert fleet.pick([A, B, C, D], M, 0.0, "least_busy", "conversation-42") == first
    fleet.failed(first, "unreachable", "refused", 0.0)
    second = fleet.pick([A, B, C, D], M, 0.0, "least_busy", "conversation-42")
    assert second not in (None, first)
    assert second == fleet.ranking("conversation-42", [A, B, C, D])[1]


def test_the_affinity_cache_stays_bounded() -> None:
    fleet = fleet_of(A, B)
    for i in range(5000):
        fleet.pick([A, B], M, 0.0, affinity=f"key-{i}")
    assert len(fleet._rankings) <= 4096  # pyright: ignore[reportPrivateUsage]


# -- options and snapshots -------------------------------------------------------


def test_server_options_are_checked() -> None:
    with pytest.raises(ValidationError, match="weight"):
        Server(A, weight=0)
    with pytest.raises(ValidationError, match="weight"):
        Server(A, weight=math.inf)
    with pytest.raises(ValidationError, match="max_concurrency"):
        Server(A, max_concurrency=0)
    with pytest.raises(ValidationError, match="url"):
        Server("")
    assert Server(A, weight=2, max_concurrency=8).weight == 2


def test_routing_choice_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AICORTEX_ROUTING", raising=False)
    assert routing_choice(None) == "priority"
    monkeypatch.setenv("AICORTEX_ROUTING", "least_busy")
    assert routing_choice(None) == "least_busy"
    assert routing_choice("round_robin") == "round_robin"
    monkeypatch.setenv("AICORTEX_ROUTING", "fastest")
    with pytest.raises(ValidationError, match="AICORTEX_ROUTING must be one of"):
        routing_choice(None)
    with pytest.raises(ValidationError, match="routing must be one of"):
        routing_choice("random")


def test_a_snapshot_reports_what_is_known() -> None:
    fleet = Fleet(60.0)
    unknown = fleet.snapshot(A, 0.0)
    assert (unknown.state, unknown.latency, unknown.loaded) == ("unknown", None, None)
    probed(fleet, A, "llama3.2:3b", loaded=("llama3.2:3b",), latency=0.02)
    fleet.node(A).inflight = 3
    state = fleet.snapshot(A, 1.0)
    assert state.state == "healthy"
    assert state.in_flight == 3
    assert state.latency == 0.02
    assert state.loaded == ("llama3.2:3b",)
    assert state.models == ("llama3.2:3b",)
    assert state.retry_in is None
    fleet.node(A).probing = True
    assert fleet.snapshot(A, 1.0).state == "probing"


def test_a_finished_answer_marks_the_model_loaded() -> None:
    fleet = Fleet(60.0)
    probed(fleet, A, loaded=())
    fleet.served(A, M)
    assert fleet.snapshot(A, 0.0).loaded == (M,)


# -- probe results -----------------------------------------------------------------


def up(url: str, *models: str) -> Health:
    return Health.ok(url, checked_at=0.0, latency=0.01, version="0.33.0", models=models)


def test_model_names_match_with_the_default_tag() -> None:
    """`llama3.2` matches a server listing `llama3.2:latest`."""
    assert up(A, "llama3.2:latest").has_model("llama3.2")
    assert not up(A, "llama3.2:1b").has_model("llama3.2")


def test_server_info_reports_whether_the_model_is_present() -> None:
    """ServerInfo.has_model is None when the server is down or no model was asked."""
    assert ServerInfo.from_health(up(A, "m"), "m").has_model is True
    assert ServerInfo.from_health(up(A, "m"), "x").has_model is False
    assert ServerInfo.from_health(up(A, "m")).has_model is None
    assert ServerInfo.from_health(Health.down(A, "x", checked_at=0), "m").has_model is None


def test_unique_keeps_first_occurrences() -> None:
    """Duplicate servers collapse to their first position."""
    assert unique([B, A, B, C, A]) == [B, A, C]
