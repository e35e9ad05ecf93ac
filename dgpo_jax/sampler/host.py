"""The host side of the rollout: the one callback the compiled loop makes, and batch preparation.

When a host wave is due, the compiled loop calls `host_callback` once for every waiting row
(through ``jax.experimental.io_callback``), with each row's last turn only. For each such row
the host decodes the turn's tokens, takes
the protocol's action (the first ``<(search|answer)>(.*?)</\\1>``), sends every query of the
call to the retriever in ONE ``search(queries)`` call, wraps the documents as the
``<information>`` observation (or uses the invalid-action notice), tokenizes and truncates it
to ``max_obs_length``, and returns fixed-shape ids plus lengths. A retriever that keeps failing
(after `search_attempts`) stops the rollout with `RolloutRetrievalError` naming its URLs and the
waiting rows, or with ``on_retriever_error="finish"`` fails those rows only (action
``ACTION_ERROR``, finish reason retriever_error, the message kept in `RolloutHost.errors`).

The compiled program finds its `RolloutHost` through an integer id (`register`), so the
program does not depend on the Python objects and is compiled once per configuration.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from dgpo_jax.models.qwen2 import span_buckets
from dgpo_jax.retrieval.errors import RetrievalError, RetrievalRequestError
from dgpo_jax.retrieval.formatting import (
    INVALID_ACTION_NOTICE,
    format_documents,
    information_observation,
    parse_action,
)
from dgpo_jax.sampler.config import (
    ACTION_ANSWER,
    ACTION_ERROR,
    ACTION_INVALID,
    ACTION_SEARCH,
    ON_RETRIEVER_ERROR,
    SamplerConfig,
)

log = logging.getLogger(__name__)


class RolloutRetrievalError(RetrievalError):
    """The retriever failed for a host wave after its retries; the rollout stops."""


def describe_retriever(retriever: Any) -> str:
    """Where a retriever searches, for error messages: its URLs, index, or class name."""
    urls = getattr(retriever, "urls", None)
    if urls:
        return ", ".join(urls) if isinstance(urls, (list, tuple)) else str(urls)
    for name in ("url", "index_dir"):
        if getattr(retriever, name, None):
            return f"{type(retriever).__name__}({getattr(retriever, name)})"
    return type(retriever).__name__


class RolloutHost:
    """Host-side state of one rollout: tokenizer, retriever, and what each row did.

    Attributes (per row, filled while the compiled loop runs):
      queries: the search queries sent to the retriever, in order.
      answers: the content of the row's answer action (None without one).
      turn_texts: the decoded text of every finished turn (prefix tokens included in turn 0).
      errors: the retriever's exception message for rows that finished with retriever_error.
    """

    def __init__(
        self,
        config: SamplerConfig,
        tokenizer: Any,
        retriever: Any,
        batch_size: int,
        topk: int | None = None,
        on_retriever_error: str = "raise",
        search_attempts: int = 2,
        retry_pause_s: float = 0.5,
    ):
        if on_retriever_error not in ON_RETRIEVER_ERROR:
            raise ValueError(
                f"on_retriever_error must be 'raise' or 'finish', got {on_retriever_error!r}"
            )
        if search_attempts < 1:
            raise ValueError(f"search_attempts must be >= 1, got {search_attempts}")
        self.on_retriever_error = on_retriever_error
        self.search_attempts = search_attempts
        self.retry_pause_s = retry_pause_s
        self.config = config
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.topk = topk
        self.batch_size = batch_size
        self.queries: list[list[str]] = [[] for _ in range(batch_size)]
        self.answers: list[str | None] = [None] * batch_size
        self.turn_texts: list[list[str]] = [[] for _ in range(batch_size)]
        self.errors: list[str | None] = [None] * batch_size
        self.num_calls = 0
        self.bytes_to_host = 0  # what the compiled loop sent to the host, summed over calls
        self.rows_per_call: list[int] = []  # queries of each call that searched
        self.empty_results = 0  # queries answered with no document
        self.short_results = 0  # queries answered with fewer than topk documents
        self.retriever_seconds = 0.0
        self.host_seconds = 0.0
        self.failure: BaseException | None = None  # an unexpected error inside the callback
        self._lock = threading.Lock()
        self.notice_ids = self._encode_truncated(INVALID_ACTION_NOTICE)

    def _encode_truncated(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(ids[: self.config.max_obs_length], np.int32)

    def _retrieve_once(self, queries: list[str]) -> list[str]:
        """Formatted documents per query. A retriever with ``retrieve`` (documents) is asked for
        them, so that results with fewer than topk documents (or none) are counted; they are
        formatted as the reference formats them (an empty result: an empty information block)."""
        kwargs = {} if self.topk is None else {"topk": self.topk}
        if hasattr(self.retriever, "retrieve"):
            results = self.retriever.retrieve(queries, **kwargs)
            self._check_length(results, queries, "retrieve")
            wanted = self.topk if self.topk is not None else getattr(self.retriever, "topk", None)
            with self._lock:
                for documents in results:
                    self.empty_results += len(documents) == 0
                    self.short_results += wanted is not None and 0 < len(documents) < wanted
            return [format_documents(documents) for documents in results]
        docs = self.retriever.search(queries, **kwargs)
        self._check_length(docs, queries, "search")
        with self._lock:
            self.empty_results += sum(1 for d in docs if not d)
        return list(docs)

    @staticmethod
    def _check_length(results, queries, method):
        if not isinstance(results, (list, tuple)) or len(results) != len(queries):
            raise ValueError(
                f"retriever.{method} returned {type(results).__name__} of length "
                f"{len(results) if hasattr(results, '__len__') else '?'} for "
                f"{len(queries)} queries"
            )

    def _search(self, queries: list[str], rows: list[int]) -> tuple[list[str] | None, str | None]:
        """Documents for every query of a wave, with up to `search_attempts` attempts. When all
        fail: ``on_retriever_error="raise"`` raises `RolloutRetrievalError` (naming the
        retriever's URLs and the waiting rows); ``"finish"`` returns the message (the rows
        finish with retriever_error). No row is ever continued with an empty observation."""
        started = time.perf_counter()
        message = ""
        try:
            for attempt in range(1, self.search_attempts + 1):
                try:
                    return self._retrieve_once(queries), None
                except RetrievalRequestError as error:  # a rejected request: retrying is futile
                    message = f"{type(error).__name__}: {error}"
                    break
                except Exception as error:  # noqa: BLE001 - any retriever failure
                    message = f"{type(error).__name__}: {error}"
                    log.warning(
                        "retriever failed for %d queries (attempt %d of %d): %s",
                        len(queries),
                        attempt,
                        self.search_attempts,
                        message,
                    )
                    if attempt < self.search_attempts:
                        time.sleep(self.retry_pause_s * attempt)
            if self.on_retriever_error == "raise":
                where = describe_retriever(self.retriever)
                shown = rows if len(rows) <= 16 else rows[:16] + ["..."]
                raise RolloutRetrievalError(
                    f"retrieval failed after {self.search_attempts} attempt(s) at {where} for "
                    f"{len(rows)} waiting row(s) {shown}: {message}"
                )
            return None, message
        finally:
            with self._lock:
                self.retriever_seconds += time.perf_counter() - started

    def handle(
        self,
        row_index: np.ndarray,
        need: np.ndarray,
        turn_tokens: np.ndarray,
        turn_len: np.ndarray,
        search_allowed: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One host call for b rows (the batch, or one batch shard with per_shard host calls):
        row_index ``[b]`` (their rows in the batch), need/search_allowed ``[b]`` bool,
        turn_tokens ``[b, Tw]`` (each waiting row's last turn, left-aligned), turn_len ``[b]``
        -> (action ``[b]`` int32, observation ids ``[b, O]`` int32, observation length ``[b]``
        int32). Shards may call at once from several threads: the bookkeeping is locked, the
        searches are not."""
        started = time.perf_counter()
        cfg = self.config
        rows = need.shape[0]
        action = np.full((rows,), ACTION_INVALID, np.int32)
        obs = np.full((rows, cfg.obs_buffer_length), cfg.pad_token_id, np.int32)
        obs_len = np.zeros((rows,), np.int32)
        search_at, queries, turns = [], [], []
        for i in np.flatnonzero(need):
            row = int(row_index[i])
            text = self.tokenizer.decode(
                turn_tokens[i, : int(turn_len[i])].tolist(), skip_special_tokens=False
            )
            turns.append((row, text))
            kind, content = parse_action(text)
            if kind == "answer":
                action[i] = ACTION_ANSWER
                self.answers[row] = content
            elif kind == "search" and search_allowed[i]:
                search_at.append(int(i))
                queries.append(content)
            else:  # no action, or a search in the final turn: the invalid-action notice
                obs[i, : len(self.notice_ids)] = self.notice_ids
                obs_len[i] = len(self.notice_ids)
        with self._lock:
            self.num_calls += 1
            self.bytes_to_host += sum(
                int(x.nbytes) for x in (row_index, need, turn_tokens, turn_len, search_allowed)
            )
            for row, text in turns:
                self.turn_texts[row].append(text)
            if queries:
                self.rows_per_call.append(len(queries))
        if queries:
            search_rows = [int(row_index[i]) for i in search_at]
            docs, error = self._search(queries, search_rows)
            for q, (i, row) in enumerate(zip(search_at, search_rows)):
                if error is not None:  # on_retriever_error="finish": these rows finish
                    action[i] = ACTION_ERROR
                    self.errors[row] = error
                    continue
                self.queries[row].append(queries[q])
                ids = self._encode_truncated(information_observation(docs[q]))
                action[i] = ACTION_SEARCH
                obs[i, : len(ids)] = ids
                obs_len[i] = len(ids)
        with self._lock:
            self.host_seconds += time.perf_counter() - started
        return action, obs, obs_len


_HOSTS: dict[int, RolloutHost] = {}
_HOSTS_LOCK = threading.Lock()
_NEXT_ID = itertools.count(1)


def register(host: RolloutHost) -> int:
    with _HOSTS_LOCK:
        host_id = next(_NEXT_ID) % (2**31 - 1)
        _HOSTS[host_id] = host
    return host_id


def unregister(host_id: int) -> None:
    with _HOSTS_LOCK:
        _HOSTS.pop(host_id, None)


def host_callback(host_id, row_index, need, turn_tokens, turn_len, search_allowed):
    """The function the compiled loop calls (numpy in, numpy out); see `RolloutHost.handle`."""
    host = _HOSTS.get(int(host_id))
    if host is None:
        raise RuntimeError(f"sampler host callback: no rollout registered under id {int(host_id)}")
    try:
        return host.handle(
            np.asarray(row_index),
            np.asarray(need),
            np.asarray(turn_tokens),
            np.asarray(turn_len),
            np.asarray(search_allowed),
        )
    except BaseException as error:
        host.failure = error
        raise


# ----------------------------------------------------------------------------------------------
# Batch preparation
# ----------------------------------------------------------------------------------------------
def _as_id_list(value, what: str, row: int) -> list[int]:
    arr = np.asarray(value)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"{what}[{row}]: expected a 1-D sequence of token ids, got shape "
            f"{arr.shape} dtype {arr.dtype}"
        )
    return arr.astype(np.int64).tolist()


def prompt_widths(max_prompt_length: int, smallest: int = 16) -> tuple[int, ...]:
    """The padded prompt widths a run compiles for: `smallest`, then two per doubling (16, 24,
    32, 48, 64, 96, ...), capped at ``max_prompt_length`` (at most ~1.5x padding, ~2 log2 widths):
    the model's `span_buckets` ladder of key-window widths."""
    return span_buckets(max_prompt_length, smallest)


def prepare_prompts(
    prompts: Sequence[Sequence[int]],
    config: SamplerConfig,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pads token-id prompts into ``ids [B, T]`` int32, ``mask [B, T]`` bool, ``active [B]``.

    A prompt longer than ``config.max_prompt_length`` is not truncated: its row is inactive
    (it finishes with prompt_too_long, nothing generated) and the other rows run as usual.
    T is the smallest of `prompt_widths` that holds the longest fitting prompt, so a run
    compiles the rollout for a few widths only.
    """
    if len(prompts) == 0:
        raise ValueError("prompts: empty batch")
    rows = [_as_id_list(p, "prompts", i) for i, p in enumerate(prompts)]
    for i, ids in enumerate(rows):
        if not ids:
            raise ValueError(f"prompts[{i}]: empty prompt (at least one token is needed)")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompts[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab_size})"
            )
    active = np.array([len(ids) <= config.max_prompt_length for ids in rows])
    longest = max([len(ids) for ids, a in zip(rows, active) if a], default=1)
    width = next(w for w in prompt_widths(config.max_prompt_length) if w >= longest)
    ids_out = np.full((len(rows), width), config.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, ids in enumerate(rows):
        if active[i]:
            ids_out[i, width - len(ids) :] = ids
            mask[i, width - len(ids) :] = True
    return ids_out, mask, active


def prepare_prefixes(
    prefixes: Sequence[Sequence[int]] | None,
    batch_size: int,
    config: SamplerConfig,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads teacher prefixes into ``ids [B, max(P, 1)]`` int32 and ``lengths [B]`` int32."""
    width = max(config.max_prefix_length, 1)
    ids_out = np.full((batch_size, width), config.pad_token_id, np.int32)
    lengths = np.zeros((batch_size,), np.int32)
    if prefixes is None:
        return ids_out, lengths
    if len(prefixes) != batch_size:
        raise ValueError(f"prefixes: {len(prefixes)} rows for a batch of {batch_size} prompts")
    for i, prefix in enumerate(prefixes):
        if prefix is None:
            continue
        ids = _as_id_list(prefix, "prefixes", i)
        if len(ids) > config.max_prefix_length:
            raise ValueError(
                f"prefixes[{i}]: {len(ids)} tokens, more than "
                f"SamplerConfig.max_prefix_length={config.max_prefix_length}"
            )
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prefixes[{i}]: token id {bad[0]} outside the vocabulary [0, {vocab_size})"
            )
        ids_out[i, : len(ids)] = ids
        lengths[i] = len(ids)
    return ids_out, lengths
