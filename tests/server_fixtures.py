"""Real llama-server processes for the server backend's tests.

The binary is the one `make llama-server` builds (scripts/build-llama-server.sh) into the
tools cache; `$CACHED_PROMPTS_LLAMA_SERVER` may name another. Tests that need it skip with
the reason when it is missing (the `llama_servers` fixture in conftest.py starts them and
stops every one when its test ends, also when the test fails).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from cached_prompts.local.engine import LLAMA_CPP_VERSION
from cached_prompts.local.model_file import default_model_path
from cached_prompts.server.launch import safe_server_flags

# scripts/build-llama-server.sh builds it from the sdist of the engine's llama-cpp-python
VERSION = LLAMA_CPP_VERSION
BINARY_ENV = "CACHED_PROMPTS_LLAMA_SERVER"
START_TIMEOUT = 120.0


def llama_server_binary() -> Path | None:
    named = os.environ.get(BINARY_ENV)
    if named:
        return Path(named)
    tools = os.environ.get("CACHED_PROMPTS_TOOLS") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cached-prompts")
    binary = Path(tools) / f"llama-server-{VERSION}" / "bin" / "llama-server"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LlamaServer:
    """One llama-server process on 127.0.0.1 serving the default SmolLM2 model."""

    def __init__(self, binary: Path, log_dir: Path, *, port: int | None = None, ctx: int = 2048,
                 parallel: int = 6, slot_dir: Path | None = None, threads: int = 1,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.binary, self.port = binary, port or free_port()
        self.extra_args = extra_args
        self.ctx, self.parallel, self.threads = ctx, parallel, threads
        self.slot_dir = slot_dir
        self.log_path = log_dir / f"llama-server-{self.port}-{time.monotonic_ns()}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "LlamaServer":
        command = [str(self.binary), "-m", str(default_model_path()), "--host", "127.0.0.1",
                   "--port", str(self.port), "-c", str(self.ctx), "-np", str(self.parallel),
                   "-t", str(self.threads), "-tb", str(self.threads), "--metrics", "--no-webui",
                   *safe_server_flags()]
        if self.slot_dir is not None:
            self.slot_dir.mkdir(parents=True, exist_ok=True)
            command += ["--slot-save-path", str(self.slot_dir)]
        command += list(self.extra_args)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"llama-server did not get ready in {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def metrics(self) -> dict[str, float]:
        values = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10.0).text.splitlines():
            if line.startswith("llamacpp:"):
                name, _, value = line.partition(" ")
                values[name.removeprefix("llamacpp:")] = float(value)
        return values

    def prompt_tokens(self) -> int:
        """Prompt tokens this server has evaluated (not taken from its cache) since it started."""
        return int(self.metrics()["prompt_tokens_total"])

    def busy(self) -> bool:
        slots = httpx.get(f"{self.url}/slots", timeout=5.0).json()
        return any(slot.get("is_processing") for slot in slots)

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as a crashed or lost machine would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


# ----- a canned HTTP server: for answers a real server cannot be made to send --------------------


class CannedServer:
    """A real HTTP server on 127.0.0.1 (a thread of the test) that answers each path with what
    the test put in `answers`: answers[path] = (status, JSON value or raw bytes, with a
    Content-Length header); a JSON answer to a request with `stream: true` is sent as llama-server
    streams it (server-sent events). It tokenizes one token per UTF-8 byte, so prefixes stay prefixes.
    `requests` keeps the JSON bodies it was sent, per path."""

    def __init__(self) -> None:
        import http.server
        import json
        import threading

        self.answers: dict[str, tuple[int, object, bool]] = {}
        self.requests: dict[str, list[object]] = {}
        canned = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet: pytest shows stderr of failures
                pass

            def do_GET(self) -> None:
                self._answer(None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self._answer(json.loads(self.rfile.read(length) or b"null"))

            def _answer(self, body: object) -> None:
                path = self.path.split("?")[0]
                canned.requests.setdefault(path, []).append(body)
                if path == "/tokenize" and path not in canned.answers and isinstance(body, dict):
                    status, value, sized = 200, {"tokens": list(str(body.get("content", "")).encode())}, True
                else:
                    status, value, sized = canned.answers.get(path, (404, {"error": {"message": "no such path"}}, True))
                if isinstance(body, dict) and body.get("stream") and not isinstance(value, bytes) and status == 200:
                    # llama-server's stream: true, one event per answer here (with its whole text)
                    events = value if isinstance(value, list) else [value]
                    data = b"".join(b"data: " + json.dumps({**event, "stop": True}).encode() + b"\n\n"
                                    for event in events)
                else:
                    data = value if isinstance(value, bytes) else json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if sized:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: as it should
                    pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def llama_server(self, n_ctx: int = 1024) -> "CannedServer":
        """Answer the probe as a llama-server does."""
        self.answers["/props"] = (200, {"total_slots": 2, "default_generation_settings": {"n_ctx": n_ctx}}, True)
        self.answers["/v1/models"] = (200, {"object": "list", "data": [{"id": "canned.gguf", "owned_by": "llamacpp"}]},
                                      True)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
