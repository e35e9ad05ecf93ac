"""The run configuration: the schema (every field with its default, documented once), the
builders of the objects it configures, validation, and ``--config`` resolution.

- `dgpo_jax.config.schema`: ``base_config``, ``nq_config``, ``ConfigError``.
- `dgpo_jax.config.build`: the objective, curriculum, sampler and optimizer configs.
- `dgpo_jax.config.validate`: ``validate(cfg)``.
- `dgpo_jax.config.resolve`: packaged config names, override checking, ``load_config``.
"""

from dgpo_jax.config.build import build_curriculum, build_objective, optim_config, sampler_config
from dgpo_jax.config.resolve import (
    available_configs,
    check_override_keys,
    load_config,
    resolve_config_path,
)
from dgpo_jax.config.schema import (
    MODES,
    ConfigError,
    base_config,
    env,
    nq_config,
    parse_rules,
    split_list,
)
from dgpo_jax.config.validate import validate
