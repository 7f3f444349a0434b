"""Property-based: no body, however odd, gets a 5xx or breaks OpenAI's error shape."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aicortex import Timeout
from aicortex.server import create_app
from fakeollama import FakeOllama, FakeOllamaFactory

pytestmark = pytest.mark.anyio

MODEL = "llama3.2:3b"
QUICK = Timeout(connect=1.0, first_token=2.0, idle=2.0, probe=0.5)
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

FIELDS = [
    "model",
    "messages",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "tools",
    "tool_choice",
    "n",
    "reasoning_effort",
    "options",
    "keep_alive",
    "think",
    "num_ctx",
    "format",
]

roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot"])
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio"])},
    optional={
        "text": json_values,
        "image_url": st.one_of(
            json_values,
            st.fixed_dictionaries(
                {
                    "url": st.sampled_from(
                        ["data:image/png;base64,iVBORw0KGgo=", "https://x/y.png", "data:,"]
                    )
                }
            ),
        ),
    },
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles},
        optional={
            "content": st.one_of(st.text(max_size=20), st.lists(parts, max_size=3), json_values),
            "tool_calls": st.lists(
                st.fixed_dictionaries(
                    {
                        "function": st.fixed_dictionaries(
                            {"name": st.text(max_size=5)},
                            optional={"arguments": st.one_of(st.text(max_size=10), json_values)},
                        )
                    },
                    optional={"id": json_values},
                ),
                max_size=2,
            ),
            "tool_call_id": json_values,
            "name": json_values,
        },
    ),
    max_size=3,
)


@st.composite
def mutated_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request with some fields replaced by anything, or dropped."""
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    if draw(st.booleans()):
        body["messages"] = draw(messages)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(json_values)
    return body


async def post(app: Any, content: bytes, content_type: str = "application/json") -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://proxy") as client:
        return await client.post(
            "/v1/chat/completions", content=content, headers={"content-type": content_type}
        )


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str)
        assert error["message"]
        assert error["code"] != "internal_error"


@pytest.fixture
def upstream(fake_ollama: FakeOllamaFactory) -> FakeOllama:
    return fake_ollama(models=[MODEL])


@FUZZ
@given(body=st.binary(max_size=300))
async def test_arbitrary_bytes_never_give_a_5xx(upstream: FakeOllama, body: bytes) -> None:
    """Random bytes: a 400 (or rarely a valid chat), never a server error."""
    app = create_app(servers=[upstream.url], timeout=QUICK)
    try:
        check(await post(app, body))
    finally:
        await app.state.aicortex.aclose()


@FUZZ
@given(value=json_values)
async def test_arbitrary_json_never_gives_a_5xx(upstream: FakeOllama, value: object) -> None:
    """Any JSON value as the body: a 400 naming what is wrong."""
    app = create_app(servers=[upstream.url], timeout=QUICK)
    try:
        check(await post(app, json.dumps(value).encode()))
    finally:
        await app.state.aicortex.aclose()


@FUZZ
@given(body=mutated_requests())
async def test_odd_requests_never_give_a_5xx(upstream: FakeOllama, body: dict[str, Any]) -> None:
    """Valid requests with fields replaced by anything: answered, or a 4xx naming the field."""
    app = create_app(servers=[upstream.url], timeout=QUICK)
    try:
        response = await post(app, json.dumps(body).encode())
    finally:
        await app.state.aicortex.aclose()
    check(response)
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["param"] is None or error["param"].split("[")[0].split(".")[0] in FIELDS
