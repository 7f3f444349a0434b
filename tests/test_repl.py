"""The pure parts of ``aicortex chat``: options, prompt commands, quoted messages and the
conversation (no terminal, no network)."""

from __future__ import annotations

import pytest

from aicortex._repl import (
    Command,
    Conversation,
    LineAssembler,
    OptionError,
    parse_command,
    parse_format,
    parse_option,
    parse_think,
    request_options,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("num_ctx=8192", ("num_ctx", 8192)),
        ("temperature=0.5", ("temperature", 0.5)),
        ('stop=["a", "b"]', ("stop", ["a", "b"])),
        ("numa=true", ("numa", True)),
        ("stop=END", ("stop", "END")),
        ("stop=", ("stop", "")),
        (" seed = 3", ("seed", 3)),
        ("note=a=b", ("note", "a=b")),
    ],
)
def test_an_option_value_is_json_else_text(text: str, expected: tuple[str, object]) -> None:
    assert parse_option(text) == expected


@pytest.mark.parametrize("text", ["num_ctx", "=1", "a-b=1", "two words=1"])
def test_a_bad_option_says_what_to_write(text: str) -> None:
    with pytest.raises(OptionError, match=r"KEY=VALUE|not an option name"):
        parse_option(text)


def test_flags_and_options_merge_and_clash() -> None:
    assert request_options(["num_ctx=1"], temperature=0.0, max_tokens=3, seed=9) == {
        "num_ctx": 1,
        "temperature": 0.0,
        "num_predict": 3,
        "seed": 9,
    }
    assert request_options(None) == {}
    with pytest.raises(OptionError, match="--max-tokens and -o num_predict= both set"):
        request_options(["num_predict=4"], max_tokens=3)
    with pytest.raises(OptionError, match="given twice"):
        request_options(["a=1", "a=2"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("off", False), ("HIGH", "high"), ("low", "low"), ("max", "max")],
)
def test_think_levels(text: str, expected: object) -> None:
    assert parse_think(text) == expected


def test_format_is_json_or_a_schema() -> None:
    assert parse_format("json") == "json"
    assert parse_format('{"type": "object"}') == {"type": "object"}
    for bad in ("yaml", "[1]", "{bad"):
        with pytest.raises(OptionError, match="--format"):
            parse_format(bad)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", Command("nothing")),
        ("   ", Command("nothing")),
        ("/bye", Command("bye")),
        ("/BYE", Command("bye")),
        ("/quit", Command("bye")),
        ("/clear", Command("clear")),
        ("/model qwen3:8b ", Command("model", "qwen3:8b")),
        ("/model", Command("model")),
        ("/?", Command("help")),
        ("/frobnicate", Command("unknown", "/frobnicate")),
        ("/usr/bin is where", Command("say", "/usr/bin is where")),
        ("hello /bye", Command("say", "hello /bye")),
        (" /bye", Command("say", " /bye")),
    ],
)
def test_prompt_lines(line: str, expected: Command) -> None:
    assert parse_command(line) == expected


def test_quoted_messages_span_lines() -> None:
    lines = LineAssembler()
    assert lines.feed("plain") == "plain"
    assert lines.feed('"""one line"""') == "one line"
    assert lines.feed('"""') is None
    assert lines.pending
    assert lines.feed("a") is None
    assert lines.feed('b"""') == "a\nb"
    assert not lines.pending
    assert lines.feed('"""start') is None
    lines.reset()
    assert lines.feed("after") == "after"


def test_a_conversation_keeps_finished_exchanges_only() -> None:
    chat = Conversation(model="m")
    assert chat.ask("q1") == [{"role": "user", "content": "q1"}]
    assert chat.messages == []  # asking does not keep anything
    chat.answered("q1", "a1")
    assert chat.ask("q2") == [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
    ]
    key = chat.affinity
    assert key == chat.affinity
    chat.clear()
    assert chat.messages == []
    assert chat.affinity != key  # a new conversation may go to another server
