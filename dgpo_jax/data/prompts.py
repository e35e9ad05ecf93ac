"""Question records -> prompt token ids, as the protocol writes them."""

from __future__ import annotations

from dgpo_jax.data.search_r1 import QARecord


def encode_prompt(record: QARecord, tokenizer, use_chat_template: bool = True) -> list[int]:
    """The protocol's prompt: the user message through the chat template when there is one."""
    messages = [{"role": r, "content": c} for r, c in record.messages]
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(record.user_content, add_special_tokens=False)]
