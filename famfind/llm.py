"""LLM calls through the ``openai`` client, with a response cache in the DuckDB file.

Any OpenAI-compatible server works (OpenAI, vLLM, Ollama, llama.cpp server): ``base_url``
and ``model`` are options, the API key comes from an environment variable. Nothing here
touches the network unless :meth:`LLM.ask` is called with a request the cache lacks.

- Cache: table ``llm_cache`` keyed by ``sha256`` of (model, messages, response format) as
  canonical JSON. Parsed and malformed replies are both cached (a re-run costs nothing);
  transport failures (after retries) are not, so a later run tries them again.
- Spend: ``max_calls`` caps the requests sent per :class:`LLM` (cache hits are free);
  requests past the cap come back with status ``"skipped"``.
- Concurrency: at most ``concurrency`` requests in flight (a thread pool).
- Retries: timeouts, connection errors, 429 and 5xx are retried by the openai client with
  exponential backoff (0.5 s doubling to 8 s, with jitter; ``Retry-After`` honoured),
  ``max_retries`` times; the number of retries taken is recorded.
- Structured output: each request carries a strict JSON schema (``response_format``
  ``json_schema``); the reply is parsed strictly by the request's ``parse`` function and a
  reply that does not parse is recorded with status ``"malformed"`` and its raw text.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from famfind.errors import FamfindError, first_line
from famfind.schema import LLM_CACHE

CACHE_SCHEMA = LLM_CACHE.ddl()


@dataclass(frozen=True)
class LLMConfig:
    """Where and how to call the LLM (``famfind scan --label`` / ``famfind label`` options)."""

    model: str = "gpt-4o-mini"
    base_url: str | None = None  # None: the openai client's default (OPENAI_BASE_URL or api.openai.com)
    api_key_env: str = "OPENAI_API_KEY"
    max_calls: int = 500
    concurrency: int = 4
    timeout: float = 60.0  # seconds per attempt
    max_retries: int = 4
    temperature: float = 0.0

    def api_key(self) -> str:
        """The key from ``api_key_env``; ``"EMPTY"`` for a local ``base_url`` without one.
        Raises ``FamfindError`` naming the variable when the default endpoint has no key."""
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if self.base_url is None:
            raise FamfindError(self.api_key_env, "environment variable not set (the API key for the LLM); "
                               "export it, or pass --llm-base-url for a local server")
        return "EMPTY"  # local OpenAI-compatible servers (vLLM, Ollama, llama.cpp) ignore it


@dataclass
class Request:
    """One chat request: ``messages``, a strict JSON ``schema`` named ``name``, and
    ``parse(obj) -> value`` that raises ``ValueError`` when the reply is not what was asked."""

    messages: list[dict[str, str]]
    name: str
    schema: dict
    parse: Callable[[Any], Any]

    def body(self, cfg: LLMConfig) -> dict:
        return {"model": cfg.model, "messages": self.messages, "temperature": cfg.temperature,
                "response_format": {"type": "json_schema",
                                    "json_schema": {"name": self.name, "strict": True, "schema": self.schema}}}

    def key(self, cfg: LLMConfig) -> str:
        return hashlib.sha256(json.dumps(self.body(cfg), sort_keys=True).encode()).hexdigest()


@dataclass
class Reply:
    """``status``: ``"ok"`` (``value`` holds the parsed reply), ``"malformed"`` (``raw`` did
    not parse), ``"error"`` (transport failure after retries), ``"skipped"`` (over
    ``max_calls``). ``cached``: served from ``llm_cache`` without a call."""

    key: str
    status: str
    value: Any = None
    raw: str | None = None
    error: str = ""
    cached: bool = False
    retries: int = 0


def strict_json(text: str | None, keys: dict[str, type]) -> dict:
    """Parse ``text`` as a JSON object with exactly ``keys`` (name -> type); raises ValueError."""
    if text is None:
        raise ValueError("empty reply")
    obj = json.loads(text)  # json.JSONDecodeError is a ValueError
    if not isinstance(obj, dict) or set(obj) != set(keys):
        raise ValueError(f"expected keys {sorted(keys)}, got {sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
    for k, t in keys.items():
        if not isinstance(obj[k], t) or (t is bool) != isinstance(obj[k], bool):
            raise ValueError(f"{k!r} is not {t.__name__}")
    return obj


@dataclass
class LLM:
    """Cached, capped, concurrent LLM calls. ``con``: an open read-write DuckDB connection."""

    cfg: LLMConfig
    con: Any
    calls: int = 0  # requests sent (cache misses)
    hits: int = 0
    _client: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        self.con.execute(CACHE_SCHEMA)

    def client(self):
        if self._client is None:
            import openai

            self._client = openai.OpenAI(api_key=self.cfg.api_key(), base_url=self.cfg.base_url, timeout=self.cfg.timeout,
                                         max_retries=self.cfg.max_retries)
        return self._client

    def _call(self, body: dict) -> tuple[str | None, int, float]:
        t = time.time()
        raw = self.client().chat.completions.with_raw_response.create(**body)
        comp = raw.parse()
        return comp.choices[0].message.content, int(getattr(raw, "retries_taken", 0)), time.time() - t

    def ask(self, requests: list[Request], progress: Callable[[int], None] | None = None) -> list[Reply]:
        """Answer every request (cache first, then at most ``max_calls`` calls in all);
        returns one :class:`Reply` per request, in order. Never raises for a failed call."""
        import openai

        out: list[Reply | None] = [None] * len(requests)
        todo: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            k = r.key(self.cfg)
            row = self.con.execute("SELECT response, status FROM llm_cache WHERE key = ?", [k]).fetchone()
            if row is not None:
                self.hits += 1
                out[i] = self._parse(r, k, row[0], cached=True)
            else:
                todo.setdefault(k, []).append(i)
        done = len(requests) - sum(map(len, todo.values()))
        if progress:
            progress(done)
        send = []
        for k, idx in todo.items():
            if self.calls >= self.cfg.max_calls:
                for i in idx:
                    out[i] = Reply(k, "skipped", error=f"--llm-max-calls {self.cfg.max_calls} reached")
            else:
                self.calls += 1
                send.append((k, idx))
        if send:
            with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
                futs = {pool.submit(self._call, requests[idx[0]].body(self.cfg)): (k, idx) for k, idx in send}
                for fut in as_completed(futs):
                    k, idx = futs[fut]
                    req = requests[idx[0]]
                    try:
                        text, retries, secs = fut.result()
                    except (openai.APIError, openai.OpenAIError) as e:  # after the client's retries
                        msg = f"{type(e).__name__}: {first_line(e, None)}"[:300]
                        for i in idx:
                            out[i] = Reply(k, "error", error=msg)
                    else:
                        rep = self._parse(req, k, text, cached=False, retries=retries)
                        self.con.execute(
                            "INSERT OR IGNORE INTO llm_cache VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [k, self.cfg.model, json.dumps(req.body(self.cfg)), text, rep.status, rep.error,
                             retries, secs, datetime.now(timezone.utc).replace(tzinfo=None)])
                        for i in idx:
                            out[i] = rep
                    done += len(idx)
                    if progress:
                        progress(done)
        return out  # type: ignore[return-value]

    @staticmethod
    def _parse(req: Request, key: str, text: str | None, cached: bool, retries: int = 0) -> Reply:
        try:
            return Reply(key, "ok", req.parse(text), text, cached=cached, retries=retries)
        except (ValueError, TypeError) as e:
            return Reply(key, "malformed", None, text, f"{type(e).__name__}: {e}"[:300], cached, retries)
