"""The packaged run configs: ``--config=NAME`` resolves to ``dgpo_jax/configs/NAME.py`` from any
working directory (`dgpo_jax.config.resolve_config_path`); a path keeps working."""
