"""The proxy served by uvicorn on 127.0.0.1 in front of fake Ollama servers, tested with httpx."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from aicortex import AsyncCortex, Timeout, ValidationError
from aicortex.server import create_app
from fakeollama import (
    FakeOllama,
    FakeOllamaFactory,
    busy,
    cut_after,
    error_after,
    refused_url,
    reply,
    stall_after,
    stall_before_headers,
    status,
)

MODEL = "llama3.2:3b"
QUICK = Timeout(connect=1.0, first_token=2.0, idle=2.0, probe=0.5)
HI = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


class Served:
    """An ASGI app served by uvicorn in a background thread on 127.0.0.1."""

    def __init__(self, app: Any) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive(), "uvicorn did not stop"


ServeFactory = Callable[..., str]


@pytest.fixture
def serve() -> Iterator[ServeFactory]:
    """Serve an app: `serve(app)` or `serve(servers=[...], api_keys=...)` → its base URL."""
    with contextlib.ExitStack() as stack:

        def start(app: Any = None, **kwargs: Any) -> str:
            if app is None:
                kwargs.setdefault("timeout", QUICK)
                app = create_app(**kwargs)
            return stack.enter_context(Served(app))

        yield start


def sse_events(text: str) -> list[Any]:
    """The data of each SSE event ("[DONE]" stays a string)."""
    events: list[Any] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    assert text.endswith("\n\n")
    return events


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The inner error object; checks OpenAI's four keys are all there."""
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- health, readiness, models -----------------------------------------------------------


def test_health_answers_without_asking_any_upstream(serve: ServeFactory) -> None:
    """/health is liveness only: 200 while the process runs, even with every upstream down."""
    url = serve(servers=[refused_url()])
    response = httpx.get(url + "/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_lists_every_upstream_and_is_200_with_one_up(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """/ready is 200 when at least one upstream is up and reports each one."""
    down = refused_url()
    up = fake_ollama(version="0.33.1")
    response = httpx.get(serve(servers=[down, up.url]) + "/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    by_url = {u["url"]: u for u in body["upstreams"]}
    assert by_url[up.url]["status"] == "up"
    assert by_url[up.url]["version"] == "0.33.1"
    assert by_url[up.url]["latency_ms"] >= 0
    assert by_url[up.url]["error"] is None
    assert by_url[down]["status"] == "down"
    assert by_url[down]["error"] == "connection refused"
    assert by_url[down]["latency_ms"] is None
    # Each upstream's routing state, as AsyncCortex.server_states() has it.
    assert by_url[up.url]["state"] == "healthy"
    assert by_url[up.url]["in_flight"] == 0
    assert by_url[up.url]["loaded"] == []
    assert by_url[down]["state"] == "ejected"
    assert by_url[down]["retry_in"] > 0


def test_ready_is_503_when_every_upstream_is_down(serve: ServeFactory) -> None:
    """With no healthy upstream /ready says unavailable with a 503."""
    response = httpx.get(serve(servers=[refused_url(), refused_url()]) + "/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert [u["status"] for u in body["upstreams"]] == ["down", "down"]


def test_models_lists_live_and_catalog_models_once(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """/v1/models: live models of healthy servers, then catalog models, no name twice."""
    server = fake_ollama(models=["llama3.2:3b", "custom-model:7b"])
    url = serve(servers=[server.url, refused_url()])
    body = httpx.get(url + "/v1/models").json()
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert ids[:2] == ["llama3.2:3b", "custom-model:7b"]
    assert len(ids) == len(set(ids))
    assert "qwen2.5:7b" in ids
    entries = {m["id"]: m for m in body["data"]}
    assert entries["custom-model:7b"]["owned_by"] == "aicortex"
    assert entries["qwen2.5:7b"]["owned_by"] == "qwen"
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in body["data"])


def test_one_model_can_be_retrieved_and_an_unknown_one_is_404(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """/v1/models/{id} works for names with tags and slashes; unknown ids suggest matches."""
    server = fake_ollama(models=["me/tuned:1b"])
    url = serve(servers=[server.url])
    assert httpx.get(url + "/v1/models/me/tuned:1b").json()["id"] == "me/tuned:1b"
    missing = httpx.get(url + "/v1/models/llama3.2:3")
    assert missing.status_code == 404
    error = error_of(missing)
    assert error["code"] == "model_not_found"
    assert "llama3.2:3b" in error["message"]


# --- chat: translation, headers, streaming -------------------------------------------------


def test_openai_fields_reach_ollama_as_native_fields(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """The native /api/chat request carries the mapped options, format, tools and knobs."""
    server = fake_ollama()
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    response = httpx.post(
        serve(servers=[server.url]) + "/v1/chat/completions",
        json={
            **HI,
            "temperature": 0.2,
            "max_completion_tokens": 50,
            "stop": ["\n"],
            "seed": 7,
            "response_format": {"type": "json_object"},
            "tools": [tool],
            "options": {"top_k": 5},
            "num_ctx": 8192,
            "keep_alive": "10m",
            "think": False,
        },
    )
    assert response.status_code == 200, response.text
    (sent,) = [r.json for r in server.requests if r.path == "/api/chat"]
    assert sent == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "options": {
            "top_k": 5,
            "temperature": 0.2,
            "seed": 7,
            "num_ctx": 8192,
            "num_predict": 50,
            "stop": ["\n"],
        },
        "format": "json",
        "tools": [tool],
        "think": False,
        "keep_alive": "10m",
    }


def test_a_non_streamed_answer_is_a_chat_completion(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """The whole answer, usage from Ollama's counts, and the serving upstream in a header."""
    server = fake_ollama(chat=reply(["The", " sky"]))
    response = httpx.post(serve(servers=[server.url]) + "/v1/chat/completions", json=HI)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-aicortex-server"] == server.url
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    assert body["choices"][0]["message"]["content"] == "The sky"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}


def test_a_sane_request_id_is_echoed_and_any_other_replaced(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """x-request-id comes back as sent when it is sane, else a fresh hex id."""
    url = serve(servers=[fake_ollama().url]) + "/v1/chat/completions"
    kept = httpx.post(url, json=HI, headers={"x-request-id": "req-42.a:b"})
    assert kept.headers["x-request-id"] == "req-42.a:b"
    replaced = httpx.post(url, json=HI, headers={"x-request-id": "bad id\t<script>"})
    generated = replaced.headers["x-request-id"]
    assert len(generated) == 32
    int(generated, 16)
    errors = httpx.post(url, content=b"{", headers={"content-type": "application/json"})
    assert len(errors.headers["x-request-id"]) == 32


def test_a_stream_is_openai_sse_ending_with_done(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Role first, text deltas, a finish chunk, the usage chunk when asked, then [DONE]."""
    server = fake_ollama(chat=reply(["Hel", "lo"], delay=0.02))
    url = serve(servers=[server.url]) + "/v1/chat/completions"
    body = {**HI, "stream": True, "stream_options": {"include_usage": True}}
    response = httpx.post(url, json=body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["x-aicortex-server"] == server.url
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "Hello"
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}


def test_a_stream_without_include_usage_has_no_usage(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """No usage chunk and no usage key unless stream_options.include_usage is set."""
    server = fake_ollama(chat=reply(["a", "b"], done_reason="length"))
    response = httpx.post(
        serve(servers=[server.url]) + "/v1/chat/completions", json={**HI, "stream": True}
    )
    chunks = sse_events(response.text)[:-1]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_streamed_tool_calls_are_openai_deltas(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """A tool call arrives as delta.tool_calls with arguments as a JSON string."""
    call = {"function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}
    server = fake_ollama(chat=reply([], tool_calls=[call]))
    response = httpx.post(
        serve(servers=[server.url]) + "/v1/chat/completions", json={**HI, "stream": True}
    )
    chunks = sse_events(response.text)[:-1]
    (delta,) = [
        c["choices"][0]["delta"] for c in chunks if "tool_calls" in c["choices"][0]["delta"]
    ]
    (tool_call,) = delta["tool_calls"]
    assert tool_call["index"] == 0
    assert tool_call["type"] == "function"
    assert tool_call["function"] == {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_that_piles_up_is_merged_and_nothing_is_lost(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """A fast model and a slow reader: frames may carry several tokens, in order, all there."""
    tokens = [f"<{i}>" for i in range(3000)]
    server = fake_ollama(chat=reply(tokens))
    url = serve(servers=[server.url]) + "/v1/chat/completions"
    with httpx.stream("POST", url, json={**HI, "stream": True}) as response:
        time.sleep(0.3)  # let the proxy read ahead
        text = "".join(response.iter_text())
    chunks = sse_events(text)[:-1]
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]]
    assert "".join(content) == "".join(tokens)
    assert len(content) < len(tokens)


# --- failures ----------------------------------------------------------------------------


def test_a_failure_before_the_first_token_fails_over_invisibly(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """A busy first server is skipped: the client sees a normal stream from the second."""
    first = fake_ollama(chat=busy())
    second = fake_ollama(chat=reply(["ok"]))
    url = serve(servers=[first.url, second.url]) + "/v1/chat/completions"
    response = httpx.post(url, json={**HI, "stream": True})
    assert response.status_code == 200
    assert response.headers["x-aicortex-server"] == second.url
    assert sse_events(response.text)[-1] == "[DONE]"
    assert first.count("/api/chat") == 1


def test_a_failure_after_the_first_token_ends_the_stream_with_an_error_frame(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """A mid-stream error: the text so far, then `data: {"error": ...}`, and no [DONE]."""
    server = fake_ollama(chat=error_after(["one", " two"], 2, "the GPU fell over", delay=0.02))
    response = httpx.post(
        serve(servers=[server.url]) + "/v1/chat/completions", json={**HI, "stream": True}
    )
    assert response.status_code == 200
    events = sse_events(response.text)
    assert "[DONE]" not in events
    error = events[-1]["error"]
    assert "the GPU fell over" in error["message"]
    assert error["type"] == "api_error"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "one two"


def test_a_non_streamed_answer_that_breaks_midway_is_asked_again_elsewhere(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Nothing reached the client yet, so a cut answer is retried on the next server."""
    first = fake_ollama(chat=cut_after(["par", "tial"], 1))
    second = fake_ollama(chat=reply(["whole"]))
    response = httpx.post(serve(servers=[first.url, second.url]) + "/v1/chat/completions", json=HI)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "whole"
    assert response.headers["x-aicortex-server"] == second.url


def test_a_non_streamed_answer_that_breaks_everywhere_is_503_naming_each_server(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Every server cuts the answer: 503, and the message says how each one failed."""
    first = fake_ollama(chat=cut_after(["par", "tial"], 1))
    second = fake_ollama(chat=cut_after(["half"], 1))
    response = httpx.post(serve(servers=[first.url, second.url]) + "/v1/chat/completions", json=HI)
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "upstream_unavailable"
    assert f"{first.url}: broke mid-answer" in error["message"]
    assert f"{second.url}: broke mid-answer" in error["message"]


def test_one_broken_stream_does_not_take_the_servers_other_models_out(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """A stream cut mid-answer: the next request, for another model, is answered by the
    same server at once, because it still answers its probe (the spare stays idle)."""
    other = "qwen2.5:7b"
    server = fake_ollama(models=[MODEL, other], chat=[cut_after(["par", "tial"], 1), reply("ok")])
    spare = fake_ollama(models=[MODEL, other])
    url = serve(servers=[server.url, spare.url])
    broken = httpx.post(url + "/v1/chat/completions", json={**HI, "stream": True})
    assert broken.status_code == 200
    assert "[DONE]" not in broken.text  # ended with an error frame
    started = time.monotonic()
    response = httpx.post(url + "/v1/chat/completions", json={**HI, "model": other})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "ok"
    assert response.headers["x-aicortex-server"] == server.url
    assert time.monotonic() - started < 0.5
    assert spare.count("/api/chat") == 0


def test_the_user_field_or_the_affinity_header_keeps_a_conversation_on_one_server(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Round robin would alternate; a `user` (or `x-aicortex-affinity`, which wins) pins
    every request of a conversation to one server."""
    servers = [fake_ollama() for _ in range(3)]
    url = serve(servers=[s.url for s in servers], routing="round_robin")

    def server_for(**kwargs: Any) -> str:
        response = httpx.post(url + "/v1/chat/completions", **kwargs)
        assert response.status_code == 200
        return response.headers["x-aicortex-server"]

    plain = {server_for(json=HI) for _ in range(3)}
    assert len(plain) == 3
    by_user = {server_for(json={**HI, "user": "alice"}) for _ in range(4)}
    assert len(by_user) == 1
    header = {"x-aicortex-affinity": "conversation-9"}
    by_header = {server_for(json=HI, headers=header) for _ in range(4)}
    assert len(by_header) == 1
    assert {server_for(json={**HI, "user": "bob"}, headers=header)} == by_header
    streamed = server_for(json={**HI, "stream": True}, headers=header)
    assert {streamed} == by_header


def test_running_out_of_total_time_is_504_upstream_timeout(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """The answer takes longer than Timeout.total: 504, and the message says which limit."""
    server = fake_ollama(chat=stall_after(["slow"], 1))
    limits = Timeout(connect=1.0, first_token=5.0, idle=5.0, total=0.5, probe=0.5)
    started = time.monotonic()
    response = httpx.post(
        serve(servers=[server.url], timeout=limits) + "/v1/chat/completions", json=HI, timeout=10
    )
    assert time.monotonic() - started < 3
    assert response.status_code == 504
    error = error_of(response)
    assert error["code"] == "upstream_timeout"
    assert "total" in error["message"]


def test_an_unknown_model_is_404_model_not_found_with_close_matches(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Every server lacks the model: 404 with OpenAI's code and 'did you mean'."""
    server = fake_ollama(models=["llama3.2:3b"])
    response = httpx.post(
        serve(servers=[server.url]) + "/v1/chat/completions", json={**HI, "model": "llama3.2:3"}
    )
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert "Did you mean" in error["message"]
    assert "'llama3.2:3b'" in error["message"]


def test_every_upstream_down_is_503_naming_each(serve: ServeFactory) -> None:
    """No server can answer: 503 api_error whose message lists the servers tried."""
    down = [refused_url(), refused_url()]
    response = httpx.post(serve(servers=down) + "/v1/chat/completions", json=HI)
    assert response.status_code == 503
    error = error_of(response)
    assert error["type"] == "api_error"
    assert error["code"] == "upstream_unavailable"
    assert all(url in error["message"] for url in down)


def test_an_upstream_400_is_a_400_with_ollamas_message(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Ollama's own rejection comes back as 400 invalid_request_error with its words."""
    server = fake_ollama(chat=status(400, {"error": '"llama3.2:3b" does not support tools'}))
    response = httpx.post(serve(servers=[server.url]) + "/v1/chat/completions", json=HI)
    assert response.status_code == 400
    error = error_of(response)
    assert "does not support tools" in error["message"]
    assert error["type"] == "invalid_request_error"


def test_a_bad_ollama_option_is_a_400_naming_options(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Options are checked before anything is sent; the error points at options."""
    server = fake_ollama()
    response = httpx.post(
        serve(servers=[server.url]) + "/v1/chat/completions",
        json={**HI, "options": {"num_ctx": "big"}},
    )
    assert response.status_code == 400
    assert error_of(response)["param"] == "options"
    assert server.count("/api/chat") == 0


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"{not json", {"content-type": "application/json"}),
        (b"model=m&messages=hi", {"content-type": "application/x-www-form-urlencoded"}),
        (b'{"model": "m", "messages": "hi"}', {}),
    ],
    ids=["invalid-json", "a-form-not-json", "invalid-field"],
)
def test_bad_bodies_are_400(serve: ServeFactory, content: bytes, headers: dict[str, str]) -> None:
    """Invalid JSON (whatever the content type says) or a wrong field: 400 in OpenAI's
    shape."""
    response = httpx.post(
        serve(servers=[refused_url()]) + "/v1/chat/completions", content=content, headers=headers
    )
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


def test_a_body_over_the_cap_is_413_whether_announced_or_chunked(serve: ServeFactory) -> None:
    """Content-Length over the cap is refused up front; a chunked body is counted as it comes."""
    url = serve(servers=[refused_url()], max_body_size=1000) + "/v1/chat/completions"
    announced = httpx.post(url, content=b" " * 1001, headers={"content-type": "application/json"})
    assert announced.status_code == 413
    assert error_of(announced)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 100

    chunked = httpx.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    small = httpx.post(url, content=b" " * 999, headers={"content-type": "application/json"})
    assert small.status_code == 400  # under the cap: parsed (and blank is not JSON)


def test_unknown_urls_and_methods_answer_in_openais_shape(serve: ServeFactory) -> None:
    """Routing errors are OpenAI errors too, not plain text."""
    url = serve(servers=[refused_url()])
    missing = httpx.post(url + "/v1/completions", json={})
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "unknown_url"
    wrong = httpx.get(url + "/v1/chat/completions")
    assert wrong.status_code == 405
    assert error_of(wrong)["code"] == "method_not_allowed"


# --- API keys ----------------------------------------------------------------------------


def test_keys_guard_everything_but_health(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Without the key: 401 invalid_api_key on every route but /health; with it: served."""
    url = serve(servers=[fake_ollama().url], api_keys=["sk-right", "sk-other"])
    assert httpx.get(url + "/health").status_code == 200
    for path in ("/ready", "/v1/models", "/nowhere"):
        response = httpx.get(url + path)
        assert response.status_code == 401, path
        assert error_of(response)["code"] == "invalid_api_key"
    wrong = httpx.post(
        url + "/v1/chat/completions", json=HI, headers={"authorization": "Bearer sk-wrong"}
    )
    assert wrong.status_code == 401
    assert "Incorrect API key" in error_of(wrong)["message"]
    for key in ("sk-right", "sk-other"):
        ok = httpx.post(
            url + "/v1/chat/completions", json=HI, headers={"authorization": f"Bearer {key}"}
        )
        assert ok.status_code == 200


def test_keys_come_from_the_environment_or_a_file(
    serve: ServeFactory,
    fake_ollama: FakeOllamaFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """AICORTEX_API_KEYS is comma-separated; a key file has one key per line and # comments."""
    server = fake_ollama()
    monkeypatch.setenv("AICORTEX_API_KEYS", " env-1 , env-2 ")
    from_env = serve(servers=[server.url])
    key_file = tmp_path / "keys"
    key_file.write_text("# the team\nfile-1\n\nfile-2  # ci\n")
    from_file = serve(servers=[server.url], api_key_file=key_file)
    for url, good, bad in [(from_env, "env-2", "file-1"), (from_file, "file-2", "env-1")]:
        headers = {"authorization": f"Bearer {good}"}
        assert httpx.get(url + "/ready", headers=headers).status_code == 200
        assert (
            httpx.get(url + "/ready", headers={"authorization": f"Bearer {bad}"}).status_code == 401
        )


def test_keys_never_reach_the_logs(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither good nor bad keys are logged, even at DEBUG."""
    caplog.set_level(logging.DEBUG)
    url = serve(servers=[fake_ollama().url], api_keys=["sk-secret-good"])
    httpx.post(
        url + "/v1/chat/completions", json=HI, headers={"authorization": "Bearer sk-secret-good"}
    )
    httpx.post(
        url + "/v1/chat/completions", json=HI, headers={"authorization": "Bearer sk-secret-bad"}
    )
    assert caplog.records
    assert not [r for r in caplog.records if "sk-secret" in r.getMessage()]


# --- disconnects ---------------------------------------------------------------------------


async def wait_for_disconnect(server: FakeOllama) -> bool:
    return await anyio.to_thread.run_sync(server.wait_for_disconnect, 1.0)


async def test_a_client_leaving_a_stream_cancels_the_upstream_request(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """The client closes mid-stream: the upstream sees its connection go within a second."""
    server = fake_ollama(chat=reply([f"t{i}" for i in range(200)], delay=0.05))
    url = serve(servers=[server.url]) + "/v1/chat/completions"
    async with (
        httpx.AsyncClient() as client,
        client.stream("POST", url, json={**HI, "stream": True}) as response,
    ):
        async for line in response.aiter_lines():
            if '"content":"t' in line:
                break
    assert await wait_for_disconnect(server)


async def test_a_client_leaving_before_the_first_token_cancels_the_upstream_request(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """Still waiting for the model to load: the upstream request is cancelled too."""
    server = fake_ollama(chat=stall_before_headers())
    url = serve(servers=[server.url]) + "/v1/chat/completions"
    async with httpx.AsyncClient() as client:
        with anyio.move_on_after(0.3):
            await client.post(url, json={**HI, "stream": True})
    assert await wait_for_disconnect(server)


async def test_a_client_leaving_a_non_streamed_request_cancels_the_upstream_request(
    serve: ServeFactory, fake_ollama: FakeOllamaFactory
) -> None:
    """The answer is being collected when the client gives up: the upstream sees it."""
    server = fake_ollama(chat=stall_after(["still", " thinking"], 2))
    url = serve(servers=[server.url]) + "/v1/chat/completions"
    async with httpx.AsyncClient() as client:
        with anyio.move_on_after(0.5):
            await client.post(url, json=HI)
    assert await wait_for_disconnect(server)


# --- lifecycle and mounting ----------------------------------------------------------------


def test_a_lazily_created_cortex_is_closed_at_shutdown(fake_ollama: FakeOllamaFactory) -> None:
    """The app makes its AsyncCortex on first use and closes it when uvicorn stops."""
    app = create_app(servers=[fake_ollama().url], timeout=QUICK)
    handle = app.state.aicortex
    with Served(app) as url:
        assert not handle.created
        assert httpx.post(url + "/v1/chat/completions", json=HI).status_code == 200
        assert handle.created
    assert not handle.created


def test_the_app_makes_its_cortex_with_the_transport_settings_given() -> None:
    """http=, max_connections= and routing= reach the AsyncCortex the app creates; with
    a cortex passed in they belong to that cortex instead."""
    handle = create_app(
        servers=["http://127.0.0.1:9"], http="httpx", max_connections=3, routing="least_busy"
    ).state
    cortex = handle.aicortex.cortex
    assert (cortex.http, cortex.limits.max_connections) == ("httpx", 3)
    assert cortex.routing == "least_busy"
    with pytest.raises(ValueError, match="health_ttl= and ejection= to the AsyncCortex"):
        create_app(AsyncCortex(), max_connections=3)
    with pytest.raises(ValidationError, match="http must be one of"):
        create_app(http="curl")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="routing must be one of"):
        create_app(routing="fastest")  # type: ignore[arg-type]


def test_a_cortex_passed_in_is_never_closed(fake_ollama: FakeOllamaFactory) -> None:
    """The caller owns the cortex it passes: the app's shutdown leaves it open."""
    cortex = AsyncCortex([fake_ollama().url], fallback=False, timeout=QUICK)
    proxy = create_app(cortex)
    open_after_shutdown: list[bool] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with proxy.router.lifespan_context(proxy):
            yield
        open_after_shutdown.append(not cortex._router.closed)  # pyright: ignore[reportPrivateUsage]
        await cortex.aclose()  # the owner closes it, on the loop that used it

    with Served(Starlette(routes=[Mount("/", app=proxy)], lifespan=lifespan)) as url:
        assert httpx.post(url + "/v1/chat/completions", json=HI).status_code == 200
    assert open_after_shutdown == [True]


def test_the_app_works_mounted_under_a_prefix(fake_ollama: FakeOllamaFactory) -> None:
    """Mounted at /llm in a host app: routes, keys and shutdown (via the host's lifespan)."""
    proxy = create_app(
        servers=[fake_ollama(chat=reply(["mounted"])).url], timeout=QUICK, api_keys=["k"]
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with proxy.router.lifespan_context(proxy):
            yield

    host = Starlette(routes=[Mount("/llm", app=proxy)], lifespan=lifespan)
    auth = {"authorization": "Bearer k"}
    with Served(host) as url:
        assert httpx.get(url + "/llm/health").status_code == 200
        assert httpx.get(url + "/llm/ready").status_code == 401
        response = httpx.post(url + "/llm/v1/chat/completions", json=HI, headers=auth)
        assert response.json()["choices"][0]["message"]["content"] == "mounted"
        assert httpx.get(url + "/llm/v1/models", headers=auth).status_code == 200
        assert proxy.state.aicortex.created
    assert not proxy.state.aicortex.created


# --- in-process (ASGI), on asyncio and trio ---------------------------------------------------


async def test_the_app_streams_and_answers_on_either_event_loop(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """Driven in-process on the test's own loop (asyncio or trio), both answer kinds work."""
    server = fake_ollama(chat=reply(["in", "-process"], thinking=["hmm"]))
    app = create_app(servers=[server.url], timeout=QUICK)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
            streamed = await client.post("/v1/chat/completions", json={**HI, "stream": True})
            whole = await client.post("/v1/chat/completions", json=HI)
    finally:
        await app.state.aicortex.aclose()
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert "".join(d.get("reasoning", "") for d in deltas) == "hmm"
    assert "".join(d.get("content", "") for d in deltas) == "in-process"
    message = whole.json()["choices"][0]["message"]
    assert (message["content"], message["reasoning"]) == ("in-process", "hmm")
