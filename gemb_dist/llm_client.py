"""A client for any OpenAI-compatible chat-completions endpoint (vLLM, TGI, hosted APIs), shared by the LLM judge
and synthetic data generation: a concurrency limit, retries with exponential backoff on 429/5xx/timeouts that
honour Retry-After, a persistent sqlite cache of answers keyed by (model, prompt), and request/token counters.
The API key comes from the environment only, never from a config file.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
from pydantic import Field, model_validator

from gemb_dist.config import Section

T = TypeVar("T")


class LLMEndpointError(ValueError):
    """The endpoint cannot be used (unreachable, rejects the key, or keeps failing); names the URL."""


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
    max_retries: int = Field(5, ge=0, description="Retries of a request after 429, 5xx, timeouts or lost connections.")
    backoff_base_s: float = Field(1.0, ge=0, description="First retry delay; doubles per retry (plus jitter).")
    backoff_max_s: float = Field(60.0, ge=0, description="Cap of one retry delay, Retry-After included.")
    max_failed_requests: int = Field(
        50, ge=0, description="Requests that may fail after all retries before the job stops naming the URL."
    )
    cache_path: str | None = Field(None, description="sqlite file of cached answers; None = no cache.")
    max_tokens: int = Field(8, gt=0, description="Completion token limit of one request.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature.")
    probe: bool = Field(True, description="Check at start (GET /models) that the endpoint answers and serves model.")

    @model_validator(mode="before")
    @classmethod
    def _reject_inline_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError("api_key must not be in a config file; export it as $GEMB_JUDGE_API_KEY (see api_key_env)")
        return data


@dataclass(frozen=True)
class Completion:
    """One answer: `content` is None unless `status == "ok"` (malformed = a 200 that is not a chat completion,
    failed = no answer after every retry)."""

    content: str | None
    status: str  # ok | malformed | failed


class ResponseCache:
    """sqlite store of answers, safe to share between threads; every write is committed at once so a crash loses
    nothing already paid for."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, content TEXT, status TEXT)")
        self._lock = threading.Lock()

    @staticmethod
    def key(model: str, prompt_text: str, max_tokens: int, temperature: float) -> str:
        # The rendered prompt holds the template, the query and the passage: a changed template is a new key.
        payload = json.dumps([model, prompt_text, max_tokens, temperature])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Completion | None:
        with self._lock:
            row = self._conn.execute("SELECT content, status FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else Completion(content=row[0], status=row[1])

    def put(self, key: str, completion: Completion) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO answers (key, content, status) VALUES (?, ?, ?)",
                (key, completion.content, completion.status),
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
    failed: int = 0
    malformed_responses: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {k: v for k, v in vars(self).items() if k != "lock"}


class _RetryableError(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class ChatClient:
    """Single-turn chat completions. Construct it at job start: with `probe` an unusable endpoint raises
    LLMEndpointError naming the URL before any work is done. Thread-safe."""

    def __init__(self, config: LLMEndpointConfig):
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        self.counters = RequestCounters()
        self._api_key = os.environ.get(config.api_key_env) or os.environ.get("OPENAI_API_KEY") or None
        self._local = threading.local()
        self._cache = ResponseCache(config.cache_path) if config.cache_path else None
        if config.probe:
            self.check_endpoint()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            if self._api_key:
                session.headers["Authorization"] = f"Bearer {self._api_key}"
        return session

    def check_endpoint(self) -> None:
        """GET {base_url}/models: raise naming the URL when it is unreachable, rejects the key, or lists models
        without the configured one. Servers that do not list models pass (their chat requests will tell)."""
        url = f"{self.base_url}/models"
        try:
            response = self._session().get(url, timeout=min(self.config.timeout_s, 10.0))
        except requests.RequestException as err:
            raise LLMEndpointError(f"LLM endpoint {url} is unreachable: {type(err).__name__}: {err}") from None
        if response.status_code in (401, 403):
            raise LLMEndpointError(
                f"LLM endpoint {url} rejected the API key (HTTP {response.status_code}); "
                f"set ${self.config.api_key_env} or $OPENAI_API_KEY"
            )
        if response.status_code != 200:
            return
        try:
            served = [m["id"] for m in response.json().get("data", [])]
        except (ValueError, TypeError, KeyError, AttributeError):
            return
        if served and self.config.model not in served:
            raise LLMEndpointError(f"LLM endpoint {url} does not serve model {self.config.model!r}; it serves {served}")

    def complete(self, prompt_text: str) -> Completion:
        """The answer to one user message, from the cache when present. Malformed answers are cached (the same
        request would get the same answer), failed requests are not."""
        cfg = self.config
        key = ResponseCache.key(cfg.model, prompt_text, cfg.max_tokens, cfg.temperature)
        if self._cache is not None and (hit := self._cache.get(key)) is not None:
            self.counters.add(cache_hits=1)
            return hit
        try:
            completion = Completion(self._post_with_retries(prompt_text), "ok")
        except _RetryableError:
            self.counters.add(failed=1)
            if self.counters.failed > cfg.max_failed_requests:
                raise LLMEndpointError(
                    f"LLM endpoint {self.base_url} failed {self.counters.failed} requests after {cfg.max_retries} "
                    f"retries each (max_failed_requests={cfg.max_failed_requests})"
                ) from None
            return Completion(None, "failed")
        except LLMEndpointError:
            raise
        except (ValueError, KeyError, IndexError, TypeError):  # a 200 whose body is not a chat completion
            self.counters.add(malformed_responses=1)
            completion = Completion(None, "malformed")
        if self._cache is not None:
            self._cache.put(key, completion)
        return completion

    def map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """`fn` over `items` with at most `max_concurrency` in flight; results in input order."""
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency) as pool:
            return list(pool.map(fn, items))

    def _post_with_retries(self, prompt_text: str) -> str:
        url = f"{self.base_url}/chat/completions"
        body = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt_text}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }
        last: _RetryableError | None = None
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self.counters.add(retries=1)
                time.sleep(self._backoff_s(attempt, last))
            try:
                return self._post_once(url, body)
            except _RetryableError as err:
                last = err
        assert last is not None
        raise last

    def _post_once(self, url: str, body: dict[str, Any]) -> str:
        self.counters.add(requests=1)
        try:
            response = self._session().post(url, json=body, timeout=self.config.timeout_s)
        except requests.Timeout as err:
            self.counters.add(timeouts=1)
            raise _RetryableError(f"timeout: {err}") from None
        except requests.ConnectionError as err:
            raise _RetryableError(f"connection: {err}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise _RetryableError(f"HTTP {response.status_code}", retry_after_s(response.headers.get("Retry-After")))
        if response.status_code in (401, 403):
            raise LLMEndpointError(f"LLM endpoint {url} rejected the API key (HTTP {response.status_code})")
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")
        payload = response.json()  # ValueError when the body is not JSON
        usage = payload.get("usage") or {}
        self.counters.add(**{k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")})
        content = payload["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError(f"message content is {type(content).__name__}, not a string")
        return content

    def _backoff_s(self, attempt: int, last: _RetryableError | None) -> float:
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
