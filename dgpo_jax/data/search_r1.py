"""Search-R1 question files (parquet): reading, validation, and the prompt template.

Row format (Search-R1's ``scripts/data_process/nq_search.py``)::

    data_source: str
    prompt: [{"role": "user", "content": <template filled with the question>}]
    ability: str
    reward_model: {"style": "rule", "ground_truth": {"target": [gold answers]}}
    extra_info: {"split": str, "index": int}

Every row is validated; a malformed row raises ``DataError`` naming the file, the row and the
field. Nothing is skipped silently.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq

# The reference prompt (typo included) and question formatting live with the protocol text.
from dgpo_jax.errors import MissingFileError, UserError
from dgpo_jax.retrieval.formatting import SEARCH_R1_PROMPT_TEMPLATE as DEFAULT_TEMPLATE
from dgpo_jax.retrieval.formatting import format_prompt as format_question

__all__ = [
    "DEFAULT_TEMPLATE",
    "format_question",
    "DataError",
    "QARecord",
    "validate_row",
    "read_search_r1_parquet",
    "read_question_files",
]


class DataError(UserError, ValueError):
    """A data file or row does not have the expected format."""


@dataclasses.dataclass(frozen=True)
class QARecord:
    """One question: the chat messages to prompt with, the gold answers, where it came from."""

    data_source: str
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...)
    golds: tuple[str, ...]
    split: str = ""
    index: int = -1
    where: str = dataclasses.field(default="", compare=False)  # 'file: row i', for errors

    @property
    def user_content(self) -> str:
        return self.messages[-1][1]


def _as_list(value: Any) -> list | None:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def validate_row(row: dict, where: str) -> QARecord:
    """One parquet row (as a dict) -> ``QARecord``; ``where`` is 'file: row i' for errors."""

    def fail(field, msg):
        raise DataError(f"{where}: field '{field}': {msg}")

    src = row.get("data_source")
    if not isinstance(src, str) or not src:
        fail("data_source", f"expected a non-empty string, got {src!r}")
    prompt = _as_list(row.get("prompt"))
    if not prompt:
        fail(
            "prompt",
            f"expected a non-empty list of {{role, content}} messages, got {row.get('prompt')!r}",
        )
    messages = []
    for j, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            fail(f"prompt[{j}].role", f"expected a message dict with a string role, got {m!r}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            fail(f"prompt[{j}].content", f"expected non-empty text, got {m.get('content')!r}")
        messages.append((m["role"], m["content"]))
    rm = row.get("reward_model")
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    if not isinstance(gt, dict) or "target" not in gt:
        fail("reward_model.ground_truth.target", f"missing (reward_model={rm!r})")
    target = gt["target"]
    golds = [target] if isinstance(target, str) else _as_list(target)
    if not golds or not all(isinstance(g, str) for g in golds):
        fail(
            "reward_model.ground_truth.target",
            f"expected a non-empty list of strings, got {target!r}",
        )
    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        fail("extra_info", f"expected a dict, got {extra!r}")
    index = extra.get("index", -1)
    return QARecord(
        src,
        tuple(messages),
        tuple(golds),
        str(extra.get("split", "")),
        int(index) if index is not None else -1,
        where,
    )


def read_search_r1_parquet(path: str | os.PathLike) -> list[QARecord]:
    """Read and validate every row of a Search-R1 parquet file."""

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"{path}: no such data file")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    required = ("data_source", "prompt", "reward_model")
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing columns {missing}; has {table.column_names}")
    if table.num_rows == 0:
        raise DataError(f"{path}: no rows")
    return [validate_row(row, f"{path}: row {i}") for i, row in enumerate(table.to_pylist())]


def read_question_files(paths: Sequence[str | os.PathLike]) -> list[QARecord]:
    """Concatenate several files (e.g. NQ train + HotpotQA train), in the given order."""
    out: list[QARecord] = []
    for p in paths:
        out.extend(read_search_r1_parquet(p))
    return out
