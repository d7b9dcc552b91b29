"""The live report's web server (Starlette on uvicorn, in a thread of the `watch` process).

Two read-only endpoints: `/` is the report page (the same builder as `cached-prompts report`,
with live.js), `/events` its live channel (server-sent events, see live.py). Nothing writes.

Safe by default, because any web page the user visits can make the browser send requests here:
  - it listens on 127.0.0.1 unless told otherwise (`--host`, with a warning);
  - a request whose Host header is not the address it listens on is refused: a page on
    attacker.example whose name was made to point at 127.0.0.1 (DNS rebinding) sends
    `Host: attacker.example`;
  - a request from another origin (an Origin header other than this server's, or a
    Sec-Fetch-Site other than same-origin) is refused, so no other site can follow the live
    channel; and only GET and HEAD are answered;
  - the page's Content-Security-Policy runs only its own two scripts (by hash) and lets it
    connect only to this server; no framing, no referrer, nothing cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

from cached_prompts.errors import OptionsError
from cached_prompts.report.live import LiveReport
from cached_prompts.report.page import content_security_policy

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
KEEP_ALIVE_SECONDS = 15.0
SAFE_METHODS = frozenset({"GET", "HEAD"})
_COMMON_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                   (b"cache-control", b"no-store"), (b"x-frame-options", b"DENY"),
                   (b"cross-origin-resource-policy", b"same-origin")]


def allowed_hosts(host: str, port: int) -> frozenset[str] | None:
    """The Host headers this server answers; None: any IP literal with the port (a server
    listening on every address cannot know its names; DNS rebinding needs a name)."""
    loopback_names = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}
    if host in ("0.0.0.0", "::", ""):
        return None
    if host in ("127.0.0.1", "localhost", "::1"):
        return frozenset(loopback_names)
    return frozenset({f"[{host}]:{port}" if ":" in host else f"{host}:{port}"})


def host_is_allowed(header: str, allowed: frozenset[str] | None, port: int) -> bool:
    header = header.strip().lower()
    if allowed is not None:
        return header in allowed
    name, _, given_port = header.rpartition(":")
    if given_port != str(port):
        return False
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


class Guard:
    """ASGI middleware: refuses foreign Host headers, other origins and unsafe methods, and adds
    the security headers to every answer."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.app, self.port = app, port
        self.allowed = allowed_hosts(host, port)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope["method"], headers)
        if refusal is not None:
            status, message = refusal
            await _plain(send, status, message)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_COMMON_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if not host_is_allowed(host, self.allowed, self.port):
            return 403, (f"refused: this server answers only requests for its own address, not Host {host!r} "
                         "(DNS rebinding protection); open the address watch printed")
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host.lower()}":
            return 403, "refused: a request from another site"
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return 403, "refused: a request from another site"
        if method not in SAFE_METHODS:
            return 405, "this server only shows the report; it changes nothing"
        return None


async def _plain(send: Any, status: int, message: str) -> None:
    body = (message + "\n").encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode("ascii")), *_COMMON_HEADERS]})
    await send({"type": "http.response.body", "body": body})


def make_app(live: LiveReport, host: str, port: int) -> Any:
    """The ASGI application: the page and its live channel behind the Guard."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    page_policy = content_security_policy(live=True) + "; frame-ancestors 'none'"

    async def page(request: Request) -> Response:
        html = await run_in_threadpool(live.page)  # reads the workspace: not on the event loop
        return HTMLResponse(html, headers={"content-security-policy": page_policy})

    async def events(request: Request) -> Response:
        return StreamingResponse(_event_stream(live), media_type="text/event-stream",
                                 headers={"content-security-policy": "default-src 'none'"})

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("not found: this server has the page / and its live channel /events\n",
                                 status_code=404)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        live.attach(asyncio.get_running_loop())
        yield

    app = Starlette(routes=[Route("/", page), Route("/events", events)],
                    exception_handlers={404: not_found}, lifespan=lifespan)
    return Guard(app, host, port)


async def _event_stream(live: LiveReport) -> AsyncIterator[str]:
    queue = live.subscribe()
    try:
        yield "retry: 1000\n\n"
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), KEEP_ALIVE_SECONDS)
            except asyncio.TimeoutError:
                yield ": still here\n\n"
                continue
            if message is None:
                return
            event, data = message
            yield f"event: {event}\ndata: {data}\n\n"
    finally:
        live.unsubscribe(queue)


class LiveServer:
    """uvicorn serving the live report in a daemon thread; `stop` ends it."""

    def __init__(self, live: LiveReport, host: str = LOOPBACK, port: int = 0) -> None:
        self.live, self.host = live, host
        self._socket = _listen(host, port)
        self.port = self._socket.getsockname()[1]
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "", "localhost") else self.host
        return f"http://[{shown}]:{self.port}/" if ":" in shown else f"http://{shown}:{self.port}/"

    def start(self) -> None:
        import uvicorn

        config = uvicorn.Config(make_app(self.live, self.host, self.port), log_level="warning", lifespan="on",
                                access_log=False, timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="cached-prompts-live", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.live.close()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._socket.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as error:
        sock.close()
        raise OptionsError(f"cannot listen on {host}:{port}: {error.strerror or error}; "
                           "choose another --port (0: any free one) or --host") from None
    sock.set_inheritable(True)
    return sock
