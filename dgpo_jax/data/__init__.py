"""Data for the search agent.

- `dgpo_jax.data.search_r1`: Search-R1 question files (parquet): reading and validation.
- `dgpo_jax.data.pipeline`: deterministic, resumable batches of questions (grain).
- `dgpo_jax.data.synthetic`: a generated fictional encyclopedia (corpus, Search-R1-format
  questions, word-level tokenizer), the embedded default for the quickstart and the tests.
"""
