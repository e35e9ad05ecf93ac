"""The command line: ``python -m dgpo_jax.launch --config=NAME [--config.key=value ...]``.

One module per launcher mode (``config.mode``): `train`, `coldstart`, `evaluate` (mode
``eval``), `export`, `plan` (the memory plan), `quickstart`. `cli` parses the flags and
dispatches; `context` builds what every mode shares (models, tokenizer, retriever, mesh);
`metrics_log` writes the metrics a run plots.
"""
