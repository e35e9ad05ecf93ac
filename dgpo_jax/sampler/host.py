"""The host side of the rollout: the one callback the compiled loop makes, and batch preparation.

When rows end a turn, the compiled loop calls `host_callback` once for all of them (through
``jax.experimental.io_callback``). For each such row the host decodes the turn's tokens, takes
the protocol's action (the first ``<(search|answer)>(.*?)</\\1>``), sends every query of the
call to the retriever in ONE ``search(queries)`` call, wraps the documents as the
``<information>`` observation (or uses the invalid-action notice), tokenizes and truncates it
to ``max_obs_length``, and returns fixed-shape ids plus lengths. A retriever that raises fails
the rows of that call only (action ``ACTION_ERROR``, the message is kept in `RolloutHost`).

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

from dgpo_jax.retrieval.formatting import (
    INVALID_ACTION_NOTICE,
    information_observation,
    parse_action,
)
from dgpo_jax.sampler.config import (
    ACTION_ANSWER,
    ACTION_ERROR,
    ACTION_INVALID,
    ACTION_SEARCH,
    SamplerConfig,
)

log = logging.getLogger(__name__)


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
    ):
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
        self.retriever_seconds = 0.0
        self.host_seconds = 0.0
        self.failure: BaseException | None = None  # an unexpected error inside the callback
        self.notice_ids = self._encode_truncated(INVALID_ACTION_NOTICE)

    def _encode_truncated(self, text: str) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return np.asarray(ids[: self.config.max_obs_length], np.int32)

    def _search(self, queries: list[str]) -> tuple[list[str] | None, str | None]:
        started = time.perf_counter()
        try:
            kwargs = {} if self.topk is None else {"topk": self.topk}
            docs = self.retriever.search(queries, **kwargs)
            if not isinstance(docs, (list, tuple)) or len(docs) != len(queries):
                raise ValueError(
                    f"retriever.search returned {type(docs).__name__} of length "
                    f"{len(docs) if hasattr(docs, '__len__') else '?'} for "
                    f"{len(queries)} queries"
                )
            return list(docs), None
        except Exception as error:  # noqa: BLE001 - any retriever failure fails these rows only
            message = f"{type(error).__name__}: {error}"
            log.warning("retriever failed for %d queries: %s", len(queries), message)
            return None, message
        finally:
            self.retriever_seconds += time.perf_counter() - started

    def handle(
        self,
        need: np.ndarray,
        tokens: np.ndarray,
        turn_start: np.ndarray,
        resp_len: np.ndarray,
        search_allowed: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """need/search_allowed ``[B]`` bool, tokens ``[B, R]``, turn_start/resp_len ``[B]`` ->
        (action ``[B]`` int32, observation ids ``[B, O]`` int32, observation length ``[B]`` int32).
        """
        started = time.perf_counter()
        self.num_calls += 1
        cfg = self.config
        batch = need.shape[0]
        width = cfg.obs_buffer_length
        action = np.full((batch,), ACTION_INVALID, np.int32)
        obs = np.full((batch, width), cfg.pad_token_id, np.int32)
        obs_len = np.zeros((batch,), np.int32)
        search_rows, queries = [], []
        for row in np.flatnonzero(need):
            ids = tokens[row, int(turn_start[row]) : int(resp_len[row])].tolist()
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            self.turn_texts[row].append(text)
            kind, content = parse_action(text)
            if kind == "answer":
                action[row] = ACTION_ANSWER
                self.answers[row] = content
            elif kind == "search" and search_allowed[row]:
                search_rows.append(row)
                queries.append(content)
            else:  # no action, or a search in the final turn: the invalid-action notice
                obs[row, : len(self.notice_ids)] = self.notice_ids
                obs_len[row] = len(self.notice_ids)
        if queries:
            docs, error = self._search(queries)
            for i, row in enumerate(search_rows):
                if error is not None:
                    action[row] = ACTION_ERROR
                    self.errors[row] = error
                    continue
                self.queries[row].append(queries[i])
                ids = self._encode_truncated(information_observation(docs[i]))
                action[row] = ACTION_SEARCH
                obs[row, : len(ids)] = ids
                obs_len[row] = len(ids)
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


def host_callback(host_id, need, tokens, turn_start, resp_len, search_allowed):
    """The function the compiled loop calls (numpy in, numpy out); see `RolloutHost.handle`."""
    host = _HOSTS.get(int(host_id))
    if host is None:
        raise RuntimeError(f"sampler host callback: no rollout registered under id {int(host_id)}")
    try:
        return host.handle(
            np.asarray(need),
            np.asarray(tokens),
            np.asarray(turn_start),
            np.asarray(resp_len),
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


def prepare_prompts(
    prompts: Sequence[Sequence[int]],
    config: SamplerConfig,
    vocab_size: int,
    pad_to_multiple: int = 8,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-pads token-id prompts into ``ids [B, T]`` int32, ``mask [B, T]`` bool, ``active [B]``.

    A prompt longer than ``config.max_prompt_length`` is not truncated: its row is inactive
    (it finishes with prompt_too_long, nothing generated) and the other rows run as usual.
    T is the longest fitting prompt rounded up to `pad_to_multiple` (fewer recompilations),
    capped at ``max_prompt_length``.
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
    width = min(-(-longest // pad_to_multiple) * pad_to_multiple, config.max_prompt_length)
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
