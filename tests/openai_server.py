"""A small OpenAI-compatible chat-completions server, run in a thread of the test process.

It speaks ``POST /v1/chat/completions`` as the OpenAI API does, with and without ``stream``
(server-sent events over chunked HTTP/1.1, the usage in a final chunk when the request asks
for ``stream_options.include_usage``), so the real ``openai`` client talks to it over real
HTTP. A test sets what the next answers are (:class:`Script`) and reads what was asked
(``requests``): the tests of ``iron_runtime_state.integrations.openai`` use it.

Modes: ``ok``; ``fail`` (HTTP 500 with an OpenAI error body); ``stall`` (waits until the test
calls :meth:`OpenAIServer.unstall` or ``stall_seconds`` pass, then answers ``ok``); ``break``
(a stream that sends its first chunks and then drops the connection mid-body);
``stall_stream`` (a stream that sends its first chunk, then waits like ``stall``).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Script:
    """What the server answers next."""

    mode: str = "ok"
    reply: str = "Hello from the test server."
    prompt_tokens: int = 120
    completion_tokens: int = 30
    cached_tokens: int = 0
    model: str | None = None  # the answer's model (default: the request's)
    send_usage: bool = True  # False: a server that never reports usage
    stall_seconds: float = 30.0


@dataclass
class OpenAIServer:
    """The running server: its URL, the script of its answers, and the requests it received."""

    httpd: ThreadingHTTPServer
    script: Script = field(default_factory=Script)
    requests: list[dict[str, Any]] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)  # a stalled request arrived
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def unstall(self) -> None:
        self.release.set()

    def reset(self) -> None:
        self.script = Script()
        self.requests.clear()
        self.started.clear()
        self.release.clear()


def _completion(server: OpenAIServer, body: dict[str, Any]) -> dict[str, Any]:
    script = server.script
    answer: dict[str, Any] = {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": script.model or body.get("model", "unknown"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": script.reply},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
    }
    if script.send_usage:
        answer["usage"] = _usage(script)
    return answer


def _usage(script: Script) -> dict[str, Any]:
    return {
        "prompt_tokens": script.prompt_tokens,
        "completion_tokens": script.completion_tokens,
        "total_tokens": script.prompt_tokens + script.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": script.cached_tokens},
    }


def _chunks(server: OpenAIServer, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    script = server.script
    base = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": script.model or body.get("model", "unknown"),
    }
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    for word in script.reply.split(" "):
        yield {**base, "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    options = body.get("stream_options") or {}
    if script.send_usage and options.get("include_usage"):
        yield {**base, "choices": [], "usage": _usage(script)}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_state: OpenAIServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        state = self.server_state
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            return
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        with state.lock:
            state.requests.append(body)
        mode = state.script.mode
        if mode == "fail":
            self._json(500, {"error": {"message": "the test server fails", "type": "server_error"}})
            return
        if mode == "stall":
            self._stall(state)
        if body.get("stream"):
            self._stream(state, body, mode)
        else:
            self._json(200, _completion(state, body))

    def _stall(self, state: OpenAIServer) -> None:
        state.started.set()
        state.release.wait(state.script.stall_seconds)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, state: OpenAIServer, body: dict[str, Any], mode: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for n, chunk in enumerate(_chunks(state, body)):
            self._send(f"data: {json.dumps(chunk)}\n\n")
            if n == 1 and mode == "break":
                # Drop the connection mid-body: the client sees an incomplete chunked read.
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            if n == 0 and mode == "stall_stream":
                self._stall(state)
        self._send("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _send(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a stream closed early, a cancelled call) is a case
        # the tests make on purpose, not a failure of the server.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def openai_server() -> Iterator[OpenAIServer]:
    """Serve on a free loopback port for the duration of the block."""
    handler: type[_Handler] = type("Handler", (_Handler,), {})
    httpd = _Server(("127.0.0.1", 0), handler)
    state = OpenAIServer(httpd)
    handler.server_state = state
    thread = threading.Thread(target=httpd.serve_forever, name="openai-test-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.unstall()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)
