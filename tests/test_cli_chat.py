"""``aicortex chat`` for people: its request options, and the interactive chat driven
through a pseudo-terminal, as someone at a keyboard drives it."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from fakeollama import FakeOllama, FakeOllamaFactory, reply
from test_cli import NO_PROXY, aicortex_cmd, assert_one_error_line, environment, start_aicortex

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX terminal")

# --------------------------------------------------------------------------- request options


def chat_body(server: FakeOllama, index: int = -1) -> dict[str, object]:
    bodies = [r.json for r in server.requests if r.path == "/api/chat"]
    body = bodies[index]
    assert isinstance(body, dict)
    return body


def test_chat_options_reach_the_server(fake_ollama: FakeOllamaFactory) -> None:
    """The dedicated flags and ``-o`` land in Ollama's ``options``; format and think too."""
    server = fake_ollama()
    result = aicortex_cmd(
        "chat", "hi", "-s", server.url,
        "--temperature", "0.2", "--max-tokens", "5", "--seed", "7",
        "-o", "num_ctx=8192", "-o", 'stop=["END"]', "-o", "mirostat_tau=5.0",
        "-o", "penalize_newline=false", "-o", "tag=plain text",
        "--format", "json", "--think", "high",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = chat_body(server)
    assert body["options"] == {
        "temperature": 0.2,
        "num_predict": 5,
        "seed": 7,
        "num_ctx": 8192,
        "stop": ["END"],
        "mirostat_tau": 5.0,
        "penalize_newline": False,
        "tag": "plain text",
    }
    assert body["format"] == "json"
    assert body["think"] == "high"


def test_chat_think_alone_means_true_and_a_schema_is_a_format(
    fake_ollama: FakeOllamaFactory,
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    server = fake_ollama()
    result = aicortex_cmd("chat", "hi", "-s", server.url, "--format", json.dumps(schema), "--think")
    assert result.returncode == 0, result.stderr
    body = chat_body(server)
    assert (body["format"], body["think"]) == (schema, True)
    assert "options" not in body


def test_chat_without_options_sends_none(fake_ollama: FakeOllamaFactory) -> None:
    server = fake_ollama()
    assert aicortex_cmd("chat", "hi", "-s", server.url).returncode == 0
    body = chat_body(server)
    assert not {"options", "format", "think"} & set(body)


def test_thinking_goes_to_stderr_and_the_answer_to_stdout(
    fake_ollama: FakeOllamaFactory,
) -> None:
    server = fake_ollama(chat=reply(["The ", "answer"], thinking=["Let me ", "see"]))
    result = aicortex_cmd("chat", "hi", "-s", server.url, "--think")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The answer\n"
    assert result.stderr == "Thinking...\nLet me see\n...done thinking.\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "warm"], "argument --temperature: 'warm' is not a number"),
        (["--max-tokens", "1.5"], "argument --max-tokens: '1.5' is not a whole number"),
        (["--max-tokens", "0"], "--max-tokens 0: give at least 1"),
        (["--temperature", "-1"], "--temperature -1.0: give 0 or more"),
        (["-o", "num_ctx"], "-o 'num_ctx' is not KEY=VALUE"),
        (["-o", "=3"], "-o '=3' is not KEY=VALUE"),
        (["-o", "num ctx=3"], "'num ctx' is not an option name"),
        (["-o", "seed=1", "-o", "seed=2"], "-o seed is given twice"),
        (["--seed", "1", "-o", "seed=2"], "--seed and -o seed= both set seed"),
        (["--format", "xml"], "--format 'xml': give json, or a JSON schema"),
        (["--format", "{not json"], "--format: the JSON schema is not valid JSON"),
        (["--think", "hard"], "--think 'hard': give true, false or a level"),
    ],
)
def test_bad_chat_options_are_bad_input(args: list[str], message: str) -> None:
    """Each is one line, status 2, before any server is asked."""
    line = assert_one_error_line(aicortex_cmd("chat", "hi", *args), 2)
    assert message in line


def test_the_prompt_is_read_from_a_pipe_without_a_dash(fake_ollama: FakeOllamaFactory) -> None:
    server = fake_ollama()
    result = aicortex_cmd("chat", "-s", server.url, stdin="piped question")
    assert (result.returncode, result.stdout) == (0, "Hello!\n"), result.stderr
    assert chat_body(server)["messages"] == [{"role": "user", "content": "piped question"}]


def test_an_empty_pipe_is_an_empty_prompt() -> None:
    assert "the prompt is empty" in assert_one_error_line(aicortex_cmd("chat"), 2)


def test_ctrl_c_mid_answer_ends_the_line_before_the_message(
    fake_ollama: FakeOllamaFactory,
) -> None:
    """The partial answer's line is ended, so ``aicortex: interrupted`` starts its own."""
    server = fake_ollama(chat=reply(["partial"] + [" more"] * 100, delay=0.2))
    with start_aicortex("chat", "hi", "-s", server.url) as process:
        assert process.stdout is not None
        assert os.read(process.stdout.fileno(), 7) == b"partial"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130
    assert stdout.endswith(b"\n")
    assert not stdout.endswith(b"\n\n")
    assert stderr == b"aicortex: interrupted\n"
    assert server.wait_for_disconnect(timeout=10)


def test_serve_help_without_the_server_extra_says_how_to_install_it() -> None:
    """Help still works without Starlette and uvicorn; running it is a one-line error."""
    hide = "import sys; sys.modules['starlette'] = sys.modules['uvicorn'] = None; "
    run = "from aicortex._cli import main; raise SystemExit(main(sys.argv[1:]))"
    for args, code in ((["serve", "--help"], 0), (["serve", "--port", "8000"], 2)):
        result = subprocess.run(
            [sys.executable, "-c", hide + run, *args],
            capture_output=True,
            text=True,
            env=environment(),
            timeout=60,
        )
        assert result.returncode == code, result.stderr
        if code == 0:
            assert result.stdout.startswith("usage: aicortex serve")
            assert "python3 -m pip install 'aicortex-core[server]'" in result.stdout
        else:
            assert result.stderr == NO_PROXY


# --------------------------------------------------------------------------- the interactive chat


class Terminal:
    """``aicortex chat ARGS`` with a pseudo-terminal as its controlling terminal: what is
    typed goes through the terminal's line discipline (so ``\\x03`` is Ctrl-C)."""

    def __init__(self, *args: str, **env: str) -> None:
        import pty

        self.master, slave = pty.openpty()
        # A new session whose leader takes the terminal as its controlling one, then
        # becomes aicortex.
        take_terminal = (
            "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
            "os.execv(sys.executable, [sys.executable, '-m', 'aicortex', *sys.argv[1:]])"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", take_terminal, "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=environment(TERM="dumb", **env),
            start_new_session=True,
        )
        os.close(slave)
        self.output = ""
        self._seen = 0

    def expect(self, text: str, timeout: float = 30) -> str:
        """Wait until ``text`` appears after what was expected before; return the output
        from there up to and including it."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(text, self._seen)) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"no {text!r} in {self.output[self._seen :]!r}")
        start, self._seen = self._seen, found + len(text)
        return self.output[start : self._seen]

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 4096)
        except OSError:  # the other side closed
            return False
        self.output += data.decode(errors="replace").replace("\r\n", "\n")
        return bool(data)

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._read(0.1)
        return self.process.wait(timeout=1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def terminal() -> Iterator[type[Terminal]]:
    opened: list[Terminal] = []

    class Opened(Terminal):
        def __init__(self, *args: str, **env: str) -> None:
            super().__init__(*args, **env)
            opened.append(self)

    yield Opened
    for term in opened:
        term.close()


def test_the_chat_keeps_the_conversation(
    fake_ollama: FakeOllamaFactory, terminal: type[Terminal]
) -> None:
    """Each question goes with the exchanges before it, to the same server even when
    balancing round robin; ``-v`` names the server; ``/bye`` leaves with status 0."""
    answers = [reply(["Paris", "."]), reply(["About 2 million", "."])]
    server, other = fake_ollama(chat=answers), fake_ollama(chat=answers)
    term = terminal("-s", server.url, "-s", other.url, "-v", AICORTEX_ROUTING="round_robin")
    term.expect("Chatting with llama3.2:3b. /help for help, /bye to leave.")
    term.expect(">>> ")
    term.type("Capital of France?\n")
    shown = term.expect(">>> ")
    assert "is answering from http://127.0.0.1:" in shown
    assert "Paris.\n" in shown
    first_server = server if server.count("/api/chat") else other
    term.type("And its population?\n")
    assert "About 2 million.\n" in term.expect(">>> ")
    assert first_server.count("/api/chat") == 2  # the same server, for its prompt cache
    assert chat_body(first_server)["messages"] == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And its population?"},
    ]
    term.type("/bye\n")
    assert term.wait() == 0


def test_model_switches_and_clear_forgets(
    fake_ollama: FakeOllamaFactory, terminal: type[Terminal]
) -> None:
    server = fake_ollama(models=["llama3.2:3b", "qwen3:8b"])
    term = terminal("-s", server.url)
    term.expect(">>> ")
    term.type("one\n")
    term.expect(">>> ")
    term.type("/model\n")
    assert "The model is llama3.2:3b." in term.expect(">>> ")
    term.type("/model qwen3:8b\n")
    assert "Chatting with qwen3:8b; the conversation starts over." in term.expect(">>> ")
    term.type("two\n")
    term.expect(">>> ")
    body = chat_body(server)
    assert body["model"] == "qwen3:8b"
    assert body["messages"] == [{"role": "user", "content": "two"}]
    term.type("three\n")
    term.expect(">>> ")
    term.type("/clear\n")
    assert "The conversation is cleared." in term.expect(">>> ")
    term.type("four\n")
    term.expect(">>> ")
    assert chat_body(server)["messages"] == [{"role": "user", "content": "four"}]
    term.type("/model nosuch:1b\n")
    term.expect(">>> ")
    term.type("five\n")
    error = term.expect(">>> ")
    assert "aicortex: error: Model 'nosuch:1b' was not found" in error
    term.type("/model qwen3:8b\n")
    term.expect(">>> ")
    term.type("six\n")
    assert "Hello!" in term.expect(">>> ")  # the error did not end the chat
    term.type("\x04")  # Ctrl-D
    assert term.wait() == 0


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(
    fake_ollama: FakeOllamaFactory, terminal: type[Terminal]
) -> None:
    """Ctrl-C mid-answer closes the stream (the server sees the disconnect), ends the
    line, and the next question is sent without the interrupted one."""
    endless = reply(["word "] * 500, delay=0.1)
    server = fake_ollama(chat=[endless, reply(["Short", "."])])
    term = terminal("-s", server.url)
    term.expect(">>> ")
    term.type("Talk forever\n")
    term.expect("word word ")
    term.type("\x03")
    assert server.wait_for_disconnect(timeout=10)
    stopped = term.expect(">>> ")
    assert stopped.endswith("\n>>> ")  # the answer's line was ended
    term.type("Something short\n")
    assert "Short.\n" in term.expect(">>> ")
    assert chat_body(server)["messages"] == [{"role": "user", "content": "Something short"}]
    term.type("/bye\n")
    assert term.wait() == 0


def test_the_prompt_takes_commands_and_multiline_messages(
    fake_ollama: FakeOllamaFactory, terminal: type[Terminal]
) -> None:
    server = fake_ollama()
    term = terminal("-s", server.url)
    term.expect(">>> ")
    term.type("/help\n")
    assert "/model [NAME]" in term.expect(">>> ")
    term.type("/nonsense\n")
    assert "Unknown command '/nonsense'; /help lists them." in term.expect(">>> ")
    term.type("\x03")  # at the prompt: a reminder, not an exit
    assert "(Ctrl-D or /bye to leave)" in term.expect(">>> ")
    term.type("\n")
    term.type('"""first line\n')
    term.expect("... ")
    term.type('second line"""\n')
    term.expect("Hello!")
    term.expect(">>> ")
    assert server.count("/api/chat") == 1
    assert chat_body(server)["messages"] == [{"role": "user", "content": "first line\nsecond line"}]
    term.type("/etc/hosts is a file\n")  # not a command: sent as it is
    term.expect(">>> ")
    messages = chat_body(server)["messages"]
    assert isinstance(messages, list)
    assert messages[-1] == {"role": "user", "content": "/etc/hosts is a file"}
    term.type("/exit\n")
    assert term.wait() == 0


def test_json_needs_a_prompt_on_a_terminal(terminal: type[Terminal]) -> None:
    term = terminal("--json")
    term.expect("aicortex: error: --json needs a PROMPT")
    assert term.wait() == 2
