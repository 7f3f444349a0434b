"""``aicortex chat``: its request options, and the interactive chat.

The parsing here is pure (no I/O): :func:`parse_option`, :func:`parse_think`,
:func:`parse_format`, :func:`request_options`, :func:`parse_command`,
:class:`LineAssembler` and :class:`Conversation`. :func:`interactive` is the loop
that reads a terminal and streams each answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ._client import ChatArgs
    from ._sync import Cortex, Stream

__all__ = [
    "Command",
    "Conversation",
    "LineAssembler",
    "OptionError",
    "interactive",
    "parse_command",
    "parse_format",
    "parse_option",
    "parse_think",
    "request_options",
]

_THINK: dict[str, bool | Literal["low", "medium", "high", "max"]] = {
    **dict.fromkeys(("true", "yes", "on", "1"), True),
    **dict.fromkeys(("false", "no", "off", "0"), False),
    "low": "low",
    "medium": "medium",
    "high": "high",
    "max": "max",
}
QUOTE = '"""'

HELP = """\
Commands:
  /bye           leave (Ctrl-D works too)
  /clear         forget the conversation so far
  /model [NAME]  switch to model NAME (no NAME: show the current one)
  /help          show this help
Ctrl-C stops the answer being written; the conversation goes on.
Start and end a message with \"\"\" to write it over several lines.
A message that starts with '/' is sent as it is if its first word is not a command."""


class OptionError(ValueError):
    """A chat option on the command line that cannot be used; the message says why."""


# --------------------------------------------------------------------------- request options


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``-o``: the value is read as JSON (``0.2``, ``true``, ``[1, 2]``),
    else kept as a string (``-o stop=END``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise OptionError(f"-o {text!r} is not KEY=VALUE (for example -o num_ctx=8192)")
    if not key.replace("_", "").isalnum():
        raise OptionError(f"-o {text!r}: {key!r} is not an option name (letters, digits and _)")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def parse_think(text: str) -> bool | Literal["low", "medium", "high", "max"]:
    """``--think [LEVEL]``: true/false, or a level of effort."""
    think = _THINK.get(text.strip().lower())
    if think is not None:
        return think
    levels = ", ".join(key for key, value in _THINK.items() if isinstance(value, str))
    raise OptionError(f"--think {text!r}: give true, false or a level ({levels})")


def parse_format(text: str) -> str | dict[str, Any]:
    """``--format``: ``json``, or a JSON schema written out as a JSON object."""
    stripped = text.strip()
    if stripped == "json":
        return "json"
    if stripped.startswith("{"):
        try:
            schema = json.loads(stripped)
        except ValueError as exc:
            raise OptionError(f"--format: the JSON schema is not valid JSON ({exc})") from None
        if isinstance(schema, dict):
            return dict(schema)  # pyright: ignore[reportUnknownArgumentType]
    raise OptionError(f"--format {text!r}: give json, or a JSON schema such as '{{\"type\": ...}}'")


def request_options(
    pairs: list[str] | None,
    *,
    temperature: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Ollama's ``options`` from ``-o KEY=VALUE`` and the dedicated flags; an option
    given twice is an error rather than a silent choice."""
    options: dict[str, Any] = {}
    for text in pairs or ():
        key, value = parse_option(text)
        if key in options:
            raise OptionError(f"-o {key} is given twice; give it once")
        options[key] = value
    flags = {"temperature": temperature, "num_predict": max_tokens, "seed": seed}
    names = {"temperature": "--temperature", "num_predict": "--max-tokens", "seed": "--seed"}
    for key, value in flags.items():
        if value is None:
            continue
        if key in options:
            raise OptionError(f"{names[key]} and -o {key}= both set {key}; give one of them")
        options[key] = value
    if max_tokens is not None and max_tokens < 1:
        raise OptionError(
            f"--max-tokens {max_tokens}: give at least 1 (-o num_predict=-1 means no limit)"
        )
    if temperature is not None and temperature < 0:
        raise OptionError(f"--temperature {temperature}: give 0 or more")
    return options


# --------------------------------------------------------------------------- the interactive chat


@dataclass(frozen=True)
class Command:
    """What a line typed at the ``>>>`` prompt asks for."""

    kind: Literal["say", "bye", "clear", "model", "help", "unknown", "nothing"]
    text: str = ""


_COMMANDS: dict[str, Literal["bye", "clear", "model", "help"]] = {
    "/bye": "bye",
    "/exit": "bye",
    "/quit": "bye",
    "/clear": "clear",
    "/model": "model",
    "/help": "help",
    "/?": "help",
}


def parse_command(line: str) -> Command:
    """A line from the prompt: a ``/command`` or a message to send."""
    if not line.strip():
        return Command("nothing")
    if line.startswith("/"):
        word, _, rest = line.partition(" ")
        kind = _COMMANDS.get(word.lower())
        if kind is not None:
            return Command(kind, rest.strip())
        if word.count("/") == 1 and word[1:].isalpha():
            return Command("unknown", word)
    return Command("say", line)


class LineAssembler:
    """Joins the lines of a message written between ``\"\"\"`` marks."""

    def __init__(self) -> None:
        self._lines: list[str] | None = None

    @property
    def pending(self) -> bool:
        """Whether a message over several lines has been started and not finished."""
        return self._lines is not None

    def feed(self, line: str) -> str | None:
        """The complete line or message, or None while a quoted message is open."""
        if self._lines is None:
            if not line.startswith(QUOTE):
                return line
            body = line[len(QUOTE) :]
            if body.endswith(QUOTE) and len(body) >= len(QUOTE):
                return body[: -len(QUOTE)]
            self._lines = [body] if body else []
            return None
        if line.endswith(QUOTE):
            self._lines.append(line[: -len(QUOTE)])
            text = "\n".join(self._lines)
            self._lines = None
            return text
        self._lines.append(line)
        return None

    def reset(self) -> None:
        """Drop a message in progress (Ctrl-C)."""
        self._lines = None


def _new_key() -> str:
    return os.urandom(16).hex()


@dataclass
class Conversation:
    """The messages so far; an answer that did not finish is not kept."""

    model: str | None = None
    messages: list[dict[str, str]] = field(default_factory=lambda: [])  # noqa: PIE807
    key: str = field(default_factory=_new_key)

    def ask(self, text: str) -> list[dict[str, str]]:
        """The messages to send for a new question (the conversation is unchanged)."""
        return [*self.messages, {"role": "user", "content": text}]

    def answered(self, question: str, answer: str) -> None:
        """Keep a finished exchange."""
        self.messages.append({"role": "user", "content": question})
        self.messages.append({"role": "assistant", "content": answer})

    def clear(self) -> None:
        """Forget the messages; later questions may go to another server."""
        self.messages.clear()
        self.key = _new_key()

    @property
    def affinity(self) -> str:
        """The key that keeps the conversation on one server (its prompt cache)."""
        return f"aicortex-chat-{self.key}"


Show = Callable[["Stream"], str]


def interactive(
    cortex: Cortex,
    conversation: Conversation,
    *,
    request: ChatArgs,
    show: Show,
    report: Callable[[BaseException], None],
) -> None:
    """Read questions until ``/bye`` or end of input; stream each answer with ``show``.

    ``show`` writes the stream and returns its text (ending its last line, even when
    interrupted); ``report`` prints an error and the chat goes on. What the chat
    itself says goes to stderr.
    """
    from ._exceptions import AICortexError

    _load_line_editing()
    lines = LineAssembler()
    model = conversation.model or cortex.default_model()
    _say(f"Chatting with {model}. /help for help, /bye to leave.")
    while True:
        try:
            line = input("... " if lines.pending else ">>> ")
        except EOFError:
            _say("")
            return
        except KeyboardInterrupt:
            lines.reset()
            _say("\n(Ctrl-D or /bye to leave)")
            continue
        text = lines.feed(line)
        if text is None:
            continue
        command = parse_command(text)
        if command.kind == "nothing":
            continue
        if command.kind == "bye":
            return
        if command.kind == "help":
            _say(HELP)
            continue
        if command.kind == "clear":
            conversation.clear()
            _say("The conversation is cleared.")
            continue
        if command.kind == "model":
            if command.text:
                conversation.model = command.text
                conversation.clear()
                _say(f"Chatting with {command.text}; the conversation starts over.")
            else:
                _say(f"The model is {conversation.model or cortex.default_model()}.")
            continue
        if command.kind == "unknown":
            _say(f"Unknown command {command.text!r}; /help lists them.")
            continue
        try:
            answer = _answer(cortex, conversation, command.text, request, show)
        except KeyboardInterrupt:
            # The stream is closed already (the server sees the disconnect); the
            # question and its partial answer are forgotten.
            continue
        except AICortexError as exc:
            report(exc)
            continue
        conversation.answered(command.text, answer)


def _answer(
    cortex: Cortex,
    conversation: Conversation,
    question: str,
    request: ChatArgs,
    show: Show,
) -> str:
    arguments: ChatArgs = {**request, "affinity": conversation.affinity}
    stream = cortex.chat(
        conversation.ask(question), model=conversation.model, stream=True, **arguments
    )
    with stream:
        return show(stream)


def _say(text: str) -> None:
    """A line of the chat's own (not the answer's), on stderr."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _load_line_editing() -> None:
    """Arrow keys and history at the prompt, where the platform has readline."""
    with contextlib.suppress(ImportError):  # Windows
        import readline  # noqa: F401  # pyright: ignore[reportUnusedImport]
