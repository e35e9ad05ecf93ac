"""Question records -> prompt token ids, as the protocol writes them."""

from __future__ import annotations

from collections.abc import Sequence

from dgpo_jax.data.search_r1 import DataError, QARecord


def encode_prompt(record: QARecord, tokenizer, use_chat_template: bool = True) -> list[int]:
    """The protocol's prompt: the user message through the chat template when there is one."""
    messages = [{"role": r, "content": c} for r, c in record.messages]
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(record.user_content, add_special_tokens=False)]


TRUNCATION_MODES = ("error", "left", "drop")


def fit_prompts(
    prompts: Sequence[Sequence[int]],
    records: Sequence[QARecord],
    max_length: int,
    truncation: str = "error",
    where: str = "",
) -> tuple[list[list[int]], list[int]]:
    """Prompts longer than ``max_length`` tokens (``sampler.max_prompt_length``), handled by
    ``data.truncation``:

    - ``error`` (the default): a `DataError` naming the first such row (its file and row, its
      length and the limit), before anything runs on it;
    - ``left``: keep the last ``max_length`` tokens (the question and the generation prompt
      are at the end; the start of the instruction is cut), as veRL's ``truncation='left'``;
    - ``drop``: leave the row out; the caller counts the dropped rows.

    Returns (the prompts to run, the indices of the records they belong to).
    """
    if truncation not in TRUNCATION_MODES:
        raise DataError(f"data.truncation: {truncation!r} is not one of {TRUNCATION_MODES}")
    out, kept = [], []
    for i, (ids, record) in enumerate(zip(prompts, records)):
        ids = list(ids)
        if len(ids) > max_length:
            if truncation == "error":
                origin = record.where or f"{record.data_source} row {record.index}"
                raise DataError(
                    f"{origin}: the prompt has {len(ids)} tokens, more than "
                    f"sampler.max_prompt_length={max_length}{where}",
                    hint="raise sampler.max_prompt_length (and sampler.cache_len), or set "
                    "--config.data.truncation=left (keep the end) or =drop (skip such rows)",
                )
            if truncation == "drop":
                continue
            ids = ids[-max_length:]
        out.append(ids)
        kept.append(i)
    return out, kept
