"""TEST DOUBLE of an OpenAI-compatible chat-completions endpoint (what vLLM or a hosted API serves).

A real HTTP server on 127.0.0.1 with a deterministic scorer instead of a language model, so tests of our client
exercise real sockets, real JSON and real failure modes. It reads the `<query>`/`<passage>` tags of a prompt:
- both present: a relevance score from token overlap, on the 0-3 or 0-100 scale the prompt asks for;
- only `<passage>`: a generation request; it answers a JSON array built from the passage's words.
Failures are scriptable: `script(["429", "500", "400", "slow", "malformed_json", "malformed_content",
"reset_mid_body"])` applies one action per coming request in order; `fail_when(substring, action)` applies an
action to every request whose prompt contains `substring`. With `api_key`, requests without that bearer key get
401 (as vLLM started with --api-key answers). Only /v1/models and /v1/chat/completions exist; any other path is 404.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def containment(query: str, passage: str) -> float:
    """Fraction of the query's words found in the passage (the graded-relevance prompt's answer)."""
    q = words(query)
    return len(q & words(passage)) / len(q) if q else 0.0


def jaccard(query: str, passage: str) -> float:
    """Word-set Jaccard overlap (the query-likelihood prompt's answer)."""
    q, p = words(query), words(passage)
    return len(q & p) / len(q | p) if q | p else 0.0


def expected_answer(prompt_text: str) -> str:
    """What the double answers for a scoring prompt, for tests that compute expectations."""
    query = _tag(prompt_text, "query")
    passage = _tag(prompt_text, "passage")
    if "0 to 100" in prompt_text:
        return str(round(100 * jaccard(query, passage)))
    return str(round(3 * containment(query, passage)))


def _tag(text: str, name: str) -> str:
    match = re.search(rf"<{name}>(.*?)</{name}>", text, re.S)
    return match.group(1) if match else ""


def default_generation(prompt_text: str) -> str:
    """A deterministic 'generated' answer: item i is "query about <passage word i> <passage word i+1>"."""
    passage_words = WORD.findall(_tag(prompt_text, "passage"))
    match = re.search(r"Write (\d+)", prompt_text)
    num = int(match.group(1)) if match else 1
    items = [f"query about {' '.join(passage_words[i : i + 2])}" for i in range(num)]
    if "label" in prompt_text:
        return json.dumps([{"text": f"if only {item}", "label": f"label{i % 2}"} for i, item in enumerate(items)])
    return json.dumps(items)


class LLMDouble:
    """Start with `with LLMDouble() as llm:`; `llm.base_url` is the `/v1` root; counters are thread-safe."""

    def __init__(
        self,
        model: str = "double-judge",
        slow_s: float = 2.0,
        generator: Callable[[str], str] | None = None,
        api_key: str | None = None,
    ):
        self.model = model
        self.api_key = api_key
        self.slow_s = slow_s
        self.generator = generator or default_generation
        self.lock = threading.Lock()
        self.num_chat_requests = 0
        self.num_model_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0  # most chat requests being served at once (checks the client's concurrency limit)
        self.prompts: list[str] = []
        self.auth_headers: list[str | None] = []
        self._script: list[str] = []
        self._rules: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def reset_counts(self) -> None:
        """Forget the requests seen so far (tests call it after a client's start-up probe)."""
        with self.lock:
            self.num_chat_requests = self.num_model_requests = self.max_in_flight = 0
            self.prompts.clear()
            self.auth_headers.clear()

    def heal(self) -> None:
        """Drop every scripted failure and rule: from now on the double answers well."""
        with self.lock:
            self._script.clear()
            self._rules.clear()

    def script(self, actions: list[str]) -> None:
        with self.lock:
            self._script.extend(actions)

    def fail_when(self, substring: str, action: str) -> None:
        with self.lock:
            self._rules.append((substring, action))

    def __enter__(self) -> LLMDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next_action(self, prompt_text: str) -> str:
        with self.lock:
            self.num_chat_requests += 1
            self.prompts.append(prompt_text)
            for substring, action in self._rules:
                if substring in prompt_text:
                    return action
            return self._script.pop(0) if self._script else "ok"

    def _answer(self, prompt_text: str) -> str:
        if "<query>" in prompt_text:
            return expected_answer(prompt_text)
        return self.generator(prompt_text)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def _authorized(self) -> bool:
                if double.api_key is None or self.headers.get("Authorization") == f"Bearer {double.api_key}":
                    return True
                self._send(401, b'{"error": {"message": "invalid api key", "code": 401}}')
                return False

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                if self.path.rstrip("/") != "/v1/models":
                    self._send(404, b'{"error": "not found"}')
                    return
                with double.lock:
                    double.num_model_requests += 1
                self._send(200, json.dumps({"object": "list", "data": [{"id": double.model}]}).encode())

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                request = json.loads(self.rfile.read(length))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                    return
                with double.lock:
                    double.auth_headers.append(self.headers.get("Authorization"))
                if not self._authorized():
                    return
                prompt_text = request["messages"][-1]["content"]
                action = double._next_action(prompt_text)
                with double.lock:
                    double.in_flight += 1
                    double.max_in_flight = max(double.max_in_flight, double.in_flight)
                try:
                    self._respond(request, prompt_text, action)
                finally:
                    with double.lock:
                        double.in_flight -= 1

            def _respond(self, request: dict, prompt_text: str, action: str) -> None:
                if action == "429":
                    self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
                elif action == "500":
                    self._send(500, b'{"error": "internal"}')
                elif action == "400":
                    self._send(400, b'{"error": {"message": "bad request"}}')
                elif action == "reset_mid_body":
                    self._reset_mid_body()
                elif action == "malformed_json":
                    self._send(200, b'{"choices": [ not json')
                else:
                    if action == "slow":
                        time.sleep(double.slow_s)
                    content = (
                        "I would rather not say." if action == "malformed_content" else double._answer(prompt_text)
                    )
                    usage = {"prompt_tokens": len(prompt_text.split()), "completion_tokens": len(content.split())}
                    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                    body = {
                        "id": f"chatcmpl-{double.num_chat_requests}",
                        "object": "chat.completion",
                        "model": request.get("model"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
                        "usage": usage,
                    }
                    self._send(200, json.dumps(body).encode())

            def _reset_mid_body(self) -> None:
                # Headers promise 4096 bytes; 20 arrive, then an RST (SO_LINGER 0) instead of the rest.
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "4096")
                self.end_headers()
                self.wfile.write(b'{"id": "chatcmpl-cut", ')
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
                self.close_connection = True

        return Handler
