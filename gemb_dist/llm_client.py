"""A client for any OpenAI-compatible chat-completions endpoint (vLLM, TGI, hosted APIs), shared by the LLM judge
and synthetic data generation. Transport and typed status errors are the `openai` package's; on top of it: a
concurrency limit, retries with backoff that honour Retry-After and stop at once when the job has failed, a
persistent sqlite cache of well-formed answers, and request/token counters. The API key comes from the
environment only, never from a config file.

What fails how: 429, 408, 409, 5xx and every transport error (refused or reset connection, a body cut short, a
read timeout) are retried; any other status is a failed request at once (a wrong `base_url` answers 404, a bad
key 401); a request still failing after its retries is counted, and past `max_failed_requests` the job stops.
Failed and malformed answers are never cached, so a rerun after a fix asks again.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import openai
from pydantic import Field, model_validator

from gemb_dist.config import Section

T = TypeVar("T")

# Statuses worth asking again (the same set the openai package retries): timeout, lock conflict, rate limit.
RETRY_STATUSES = frozenset({408, 409, 429})
PROBE_PROMPT = "Reply with the word ok."


class LLMEndpointError(ValueError):
    """The endpoint cannot be used (unreachable, rejects the key or path, or keeps failing); names the URL."""


class LLMEndpointConfig(Section):
    base_url: str = Field(..., description="Endpoint root including /v1, e.g. http://127.0.0.1:8000/v1.")
    model: str = Field(..., description="Model name sent in each request (as served by the endpoint).")
    api_key_env: str = Field(
        "GEMB_JUDGE_API_KEY",
        description="Environment variable holding the API key (OPENAI_API_KEY is the fallback); "
        "the key itself is never part of a config.",
    )
    max_concurrency: int = Field(8, gt=0, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request connect and read timeout.")
    max_retries: int = Field(
        5, ge=0, description="Retries of a request after 408/409/429, 5xx, timeouts or transport errors."
    )
    backoff_base_s: float = Field(1.0, ge=0, description="First retry delay; doubles per retry (plus jitter).")
    backoff_max_s: float = Field(60.0, ge=0, description="Cap of one retry delay, Retry-After included.")
    max_failed_requests: int = Field(
        50,
        ge=0,
        description="Requests that may fail (after all retries, or at once on a 4xx) before the job stops "
        "naming the URL; pending requests are then cancelled.",
    )
    cache_path: str | None = Field(None, description="sqlite file of cached well-formed answers; None = no cache.")
    max_tokens: int = Field(8, gt=0, description="Completion token limit of one request.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature.")
    probe: bool = Field(
        True,
        description="Check at start that POST {base_url}/chat/completions answers 200 with a chat completion, "
        "and (where GET /models lists models) that the endpoint serves `model`.",
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_inline_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError("api_key must not be in a config file; export it as $GEMB_JUDGE_API_KEY (see api_key_env)")
        return data

    @model_validator(mode="after")
    def _check_url(self) -> LLMEndpointConfig:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {self.base_url!r} must start with http:// or https://")
        return self


@dataclass(frozen=True)
class Completion:
    """One answer: `content` is None unless `status == "ok"` (malformed = a 200 that is not a chat completion or
    that the caller's `well_formed` refuses, failed = no answer after every retry, or a 4xx)."""

    content: str | None
    status: str  # ok | malformed | failed


class ResponseCache:
    """sqlite store of well-formed answers, safe to share between threads; every write is committed at once so a
    crash loses nothing already paid for."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, content TEXT, status TEXT)")
        self._lock = threading.Lock()

    @staticmethod
    def key(base_url: str, body: dict[str, Any], template_version: str) -> str:
        # Everything that decides the answer: where it was asked, the whole request, and how the answer is read.
        payload = json.dumps({"base_url": base_url, "body": body, "template": template_version}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT content FROM answers WHERE key = ? AND status = 'ok'", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, content: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO answers (key, content, status) VALUES (?, ?, 'ok')", (key, content)
            )

    def close(self) -> None:
        with self._lock:
            self._conn.close()


@dataclass
class RequestCounters:
    """Request and token counters (thread-safe), read through `ChatClient.metrics()`."""

    requests: int = 0
    retries: int = 0
    timeouts: int = 0
    transport_errors: int = 0
    failed: int = 0
    malformed_responses: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> int:
        """Add the deltas; returns the new value of the last one named (for threshold checks under the lock)."""
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, value := getattr(self, name) + delta)
        return value

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _Failed(Exception):
    """A request that will not succeed by asking again (a 4xx other than 408/409/429)."""


class ChatClient:
    """Single-turn chat completions. Construct it at job start: with `probe` an unusable endpoint raises
    LLMEndpointError naming the URL before any work is done. Thread-safe; after a fatal error every pending
    request of `map` is cancelled and retries in their backoff stop."""

    def __init__(self, config: LLMEndpointConfig):
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.counters = RequestCounters()
        self._api_key = os.environ.get(config.api_key_env) or os.environ.get("OPENAI_API_KEY") or None
        # Retries are ours (max_retries=0): our counters see each one and a fatal error interrupts their sleep.
        # Without a key, "EMPTY" is what servers started without auth (vLLM without --api-key) expect.
        self._openai = openai.OpenAI(
            base_url=self.base_url, api_key=self._api_key or "EMPTY", max_retries=0, timeout=config.timeout_s
        )
        self._cache = ResponseCache(config.cache_path) if config.cache_path else None
        self._fatal = threading.Event()
        self._fatal_error: LLMEndpointError | None = None
        if config.probe:
            self.check_endpoint()

    # ------------------------------------------------------------------------------------------ start-up probe
    def check_endpoint(self) -> None:
        """Raise naming the URL unless POST {base_url}/chat/completions answers 200 with a chat completion (the
        request every job sends, with transient failures retried), and unless GET /models, where the server lists
        models, lists the configured one."""
        url = f"{self.base_url}/chat/completions"
        body = self._body(PROBE_PROMPT) | {"max_tokens": 1}
        try:
            # A few retries only: a server that is still starting is waited for, a wrong URL is not.
            self._post_with_retries(body, count=False, max_retries=min(self.config.max_retries, 2))
        except _Retryable as err:
            raise LLMEndpointError(f"LLM endpoint {url} is unreachable or failing: {err}") from None
        except _Failed as err:
            raise LLMEndpointError(f"LLM endpoint {url} refused the probe request: {err}{self._hint(err)}") from None
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise LLMEndpointError(f"LLM endpoint {url} answered 200 but not with a chat completion: {err}") from None
        served = self._served_models()
        if served and self.config.model not in served:
            raise LLMEndpointError(
                f"LLM endpoint {self.base_url}/models does not serve model {self.config.model!r}; it serves {served}"
            )

    def _hint(self, err: Exception) -> str:
        text = str(err)
        if text.startswith("HTTP 404"):
            return "; does base_url end with the API root (often /v1)?"
        if text.startswith(("HTTP 401", "HTTP 403")):
            return f"; set ${self.config.api_key_env} or $OPENAI_API_KEY"
        return ""

    def _served_models(self) -> list[str]:
        try:
            return [m.id for m in self._openai.models.list().data]
        except (openai.OpenAIError, AttributeError, TypeError, ValueError):
            return []  # servers that do not list models pass; their chat requests tell

    # ------------------------------------------------------------------------------------------ requests
    def complete(
        self, prompt_text: str, template_version: str, well_formed: Callable[[str], bool] | None = None
    ) -> Completion:
        """The answer to one user message, from the cache when present. `template_version` names the prompt
        template and how its answer is read (part of the cache key); `well_formed` decides which answers are
        usable (only those are cached)."""
        if self._fatal.is_set():
            self._raise_fatal()
        body = self._body(prompt_text)
        key = ResponseCache.key(self.base_url, body, template_version)
        if self._cache is not None and (hit := self._cache.get(key)) is not None:
            self.counters.add(cache_hits=1)
            return Completion(hit, "ok")
        try:
            content = self._post_with_retries(body)
        except (_Retryable, _Failed) as err:
            self._count_failure(err)
            return Completion(None, "failed")
        except (ValueError, KeyError, IndexError, TypeError):  # a 200 whose body is not a chat completion
            self.counters.add(malformed_responses=1)
            return Completion(None, "malformed")
        if well_formed is not None and not well_formed(content):
            return Completion(content, "malformed")
        if self._cache is not None:
            self._cache.put(key, content)
        return Completion(content, "ok")

    def _count_failure(self, err: Exception) -> None:
        failed = self.counters.add(failed=1)
        if failed > self.config.max_failed_requests:
            self.fail(
                LLMEndpointError(
                    f"LLM endpoint {self.base_url} failed {failed} requests (max_failed_requests="
                    f"{self.config.max_failed_requests}, {self.config.max_retries} retries each for transient "
                    f"errors); last: {err}{self._hint(err)}"
                )
            )

    def fail(self, error: LLMEndpointError) -> None:
        """Stop the job: every later or pending request raises `error` (the first fatal error wins)."""
        if not self._fatal.is_set():
            self._fatal_error = error
            self._fatal.set()
        self._raise_fatal()

    def _raise_fatal(self) -> None:
        raise self._fatal_error or LLMEndpointError(f"LLM endpoint {self.base_url}: the client is closed")

    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """`fn` over `items` with at most `max_concurrency` in flight; results in input order. The first error
        cancels everything not yet started and is raised without waiting for queued work."""
        if not items:
            return []
        pool = ThreadPoolExecutor(max_workers=self.config.max_concurrency)
        futures: list[Future[T]] = [pool.submit(fn, item) for item in items]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                raise failed.exception()  # type: ignore[misc]
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _body(self, prompt_text: str) -> dict[str, Any]:
        return {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt_text}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }

    def _post_with_retries(self, body: dict[str, Any], count: bool = True, max_retries: int | None = None) -> str:
        last: _Retryable | None = None
        for attempt in range((self.config.max_retries if max_retries is None else max_retries) + 1):
            if attempt:
                if count:
                    self.counters.add(retries=1)
                if self._fatal.wait(self._backoff_s(attempt, last)):
                    self._raise_fatal()  # another request failed the job: stop waiting
            try:
                return self._post_once(body, count)
            except _Retryable as err:
                last = err
        assert last is not None
        raise last

    def _post_once(self, body: dict[str, Any], count: bool) -> str:
        if count:
            self.counters.add(requests=1)
        try:
            raw = self._openai.chat.completions.with_raw_response.create(**body)
        except openai.APITimeoutError as err:
            if count:
                self.counters.add(timeouts=1)
            raise _Retryable(f"timeout after {self.config.timeout_s}s: {err}") from None
        except openai.APIConnectionError as err:  # refused, reset, a body cut short: httpx's errors, wrapped
            if count:
                self.counters.add(transport_errors=1)
            cause = err.__cause__
            raise _Retryable(f"transport: {type(cause).__name__ if cause else ''} {cause or err}") from None
        except openai.APIStatusError as err:
            status = err.status_code
            reason = f"HTTP {status}: {err.response.text[:200]}"
            if status in RETRY_STATUSES or status >= 500:
                raise _Retryable(reason, retry_after_s(err.response.headers.get("Retry-After"))) from None
            raise _Failed(reason) from None
        payload = json.loads(raw.text)  # ValueError when the body is not JSON
        if count:
            usage = payload.get("usage") or {}
            names = ("prompt_tokens", "completion_tokens", "total_tokens")
            self.counters.add(**{k: int(usage.get(k) or 0) for k in names})
        content = payload["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError(f"message content is {type(content).__name__}, not a string")
        return content

    def _backoff_s(self, attempt: int, last: _Retryable | None) -> float:
        if last is not None and last.retry_after_s is not None:
            return min(last.retry_after_s, self.config.backoff_max_s)
        delay = self.config.backoff_base_s * 2 ** (attempt - 1)
        return min(delay * (1 + 0.25 * random.random()), self.config.backoff_max_s)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Counters as a flat dict for `mlflow.log_metrics` (`tokens` is the endpoint's total_tokens)."""
        values = self.counters.snapshot()
        values["tokens"] = values.pop("total_tokens")
        return {f"{prefix}{k}": float(v) for k, v in values.items()}

    def close(self) -> None:
        self._fatal.set()  # wakes any retry still sleeping in a cancelled map
        self._openai.close()
        if self._cache is not None:
            self._cache.close()


def retry_after_s(header: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
