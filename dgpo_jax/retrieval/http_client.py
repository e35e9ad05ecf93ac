"""`HttpRetriever`: the client of a ``POST /retrieve`` server (this project's or Search-R1's)."""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Sequence

import requests

from dgpo_jax.retrieval.documents import (
    Document,
    FormattingRetriever,
    check_queries,
    check_topk,
    documents_from_response,
)
from dgpo_jax.retrieval.errors import (
    RetrievalRequestError,
    RetrievalResponseError,
    RetrievalUnavailableError,
)

logger = logging.getLogger(__name__)

TOKEN_ENV_VAR = "DGPO_RETRIEVAL_TOKEN"
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


def normalize_url(url: str) -> str:
    """``http://host:port`` or ``http://host:port/retrieve`` -> the ``/retrieve`` endpoint URL."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"retrieval URL must start with http:// or https://, got {url!r}")
    url = url.rstrip("/")
    return url if url.endswith("/retrieve") else url + "/retrieve"


class HttpRetriever(FormattingRetriever):
    """Retrieves over HTTP from one or more servers following the reference retrieval API.

    Requests go round-robin over `urls`; a failed request (connection error, timeout, 5xx, 429)
    moves on to the next URL at once, and after each full round over the URLs the client
    sleeps with exponential backoff (`backoff_s`, doubling, capped at `max_backoff_s`, with
    jitter). It gives up with `RetrievalUnavailableError` after `max_retries` retries or once
    `deadline` seconds have passed since the call began, whichever comes first. A 4xx answer
    (other than 408/425/429) is not retried: it raises `RetrievalRequestError` with the
    server's message. An answer that breaks the API raises `RetrievalResponseError`.

    Connections are reused (one `requests.Session` per thread). Large batches are sent in
    chunks of `max_batch_size` queries.

    Args:
      urls: a server URL or a list of them, with or without the ``/retrieve`` path.
      topk: documents per query when `retrieve` gets ``topk=None`` (reference default 3).
      timeout: seconds to wait for one answer.
      connect_timeout: seconds to wait for a connection.
      max_retries: retries after the first attempt, across all URLs.
      deadline: seconds a whole `retrieve` call may take, retries included.
      backoff_s, max_backoff_s: first pause between rounds of attempts, and its cap.
      token: bearer token for servers started with one (default: $DGPO_RETRIEVAL_TOKEN).
      max_batch_size: most queries per request (the server's --max-queries must allow it).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        topk: int = 3,
        timeout: float = 30.0,
        connect_timeout: float = 3.0,
        max_retries: int = 5,
        deadline: float = 120.0,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        token: str | None = None,
        max_batch_size: int = 512,
    ):
        url_list = [urls] if isinstance(urls, str) else list(urls)
        if not url_list:
            raise ValueError("HttpRetriever needs at least one URL")
        self.urls = [normalize_url(url) for url in url_list]
        self.topk = check_topk(topk, 3)
        for name, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
            ("deadline", deadline),
            ("max_batch_size", max_batch_size),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.max_retries = int(max_retries)
        self.deadline = float(deadline)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.max_batch_size = int(max_batch_size)
        token = token if token is not None else os.environ.get(TOKEN_ENV_VAR) or None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._next_url = itertools.count()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(
                pool_connections=len(self.urls), pool_maxsize=4, max_retries=0
            )
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    def close(self) -> None:
        """Closes this thread's connections (other threads' sessions close when collected)."""
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
            self._local.session = None

    def retrieve(self, queries: list[str], topk: int | None = None) -> list[list[Document]]:
        queries = check_queries(queries)
        topk = check_topk(topk, self.topk)
        started = time.monotonic()
        documents: list[list[Document]] = []
        for start in range(0, len(queries), self.max_batch_size):
            chunk = queries[start : start + self.max_batch_size]
            payload = {"queries": chunk, "topk": topk, "return_scores": True}
            documents.extend(self._post(payload, len(chunk), started))
        return documents

    def _post(self, payload: dict, num_queries: int, started: float) -> list[list[Document]]:
        errors: list[str] = []
        attempts = 0
        failures_since_sleep = 0
        backoff = self.backoff_s
        while True:
            remaining = self.deadline - (time.monotonic() - started)
            if remaining <= 0:
                raise self._unavailable(
                    f"the deadline of {self.deadline:g} s passed", attempts, errors
                )
            with self._lock:
                url = self.urls[next(self._next_url) % len(self.urls)]
            attempts += 1
            try:
                return self._try_once(url, payload, num_queries, remaining)
            except _RetryableFailure as failure:
                errors.append(f"{url}: {failure}")
            logger.warning("retrieval attempt %d failed: %s", attempts, errors[-1])
            if attempts > self.max_retries:
                raise self._unavailable(f"{attempts} attempts failed", attempts, errors)
            failures_since_sleep += 1
            if failures_since_sleep >= len(self.urls):
                failures_since_sleep = 0
                pause = min(backoff, self.max_backoff_s) * random.uniform(0.5, 1.0)
                backoff *= 2
                remaining = self.deadline - (time.monotonic() - started)
                if pause >= remaining:
                    time.sleep(max(remaining, 0.0))
                    raise self._unavailable(
                        f"the deadline of {self.deadline:g} s passed", attempts, errors
                    )
                time.sleep(pause)

    def _try_once(
        self, url: str, payload: dict, num_queries: int, remaining: float
    ) -> list[list[Document]]:
        """One request. Raises _RetryableFailure when another attempt may succeed."""
        timeout = (min(self.connect_timeout, remaining), min(self.timeout, remaining))
        try:
            response = self._session().post(
                url, json=payload, headers=self._headers, timeout=timeout
            )
        except requests.exceptions.Timeout as exc:
            raise _RetryableFailure(f"timed out ({type(exc).__name__})") from exc
        except (
            requests.exceptions.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
        ) as exc:
            raise _RetryableFailure(
                f"connection failed ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
        if response.status_code in _RETRYABLE_STATUS:
            raise _RetryableFailure(f"HTTP {response.status_code}: {_error_message(response)}")
        if 400 <= response.status_code < 600:
            raise RetrievalRequestError(
                f"retrieval server {url} rejected the request with HTTP {response.status_code}: "
                f"{_error_message(response)}",
                status_code=response.status_code,
            )
        try:
            body = response.json()
        except ValueError as exc:
            raise RetrievalResponseError(
                f"retrieval server {url} answered HTTP {response.status_code} with a body that is "
                f"not JSON: {response.text[:200]!r}"
            ) from exc
        return documents_from_response(body, num_queries, source=f"answer of {url}")

    def _unavailable(self, why: str, attempts: int, errors: list[str]) -> RetrievalUnavailableError:
        last = errors[-1] if errors else "no attempt could be made"
        return RetrievalUnavailableError(
            f"retrieval failed: {why} ({attempts} attempts to {len(self.urls)} server(s): "
            f"{', '.join(self.urls)}); last error: {last}",
            attempts=attempts,
            errors=errors,
        )


class _RetryableFailure(Exception):
    """One attempt failed in a way another attempt (or another server) may not."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _error_message(response: requests.Response) -> str:
    """The server's error text: this project's ``{"error": ...}``, FastAPI's ``detail``, or raw."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason or ""
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if key in body:
                return str(body[key])[:500]
    return str(body)[:300]
