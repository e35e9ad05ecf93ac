"""``--config=NAME`` or a path -> a config file; command-line overrides checked by name.

A bare name (``dgpo_nq``, or ``dgpo_nq.py``) is a config packaged in ``dgpo_jax/configs/``, found
from any working directory; anything that exists as a file is used as a path. ``load_config``
parses ``--config`` and its ``--config.key=value`` overrides exactly as the launcher does, after
checking every override names a field (an unknown one is an error naming the closest field).
"""

from __future__ import annotations

import difflib
import importlib.util
import os
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from dgpo_jax.config.schema import ConfigError

PACKAGED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def available_configs() -> list[str]:
    """Names of the packaged configs."""
    return sorted(
        f[:-3] for f in os.listdir(PACKAGED_DIR) if f.endswith(".py") and not f.startswith("_")
    )


def resolve_config_path(spec: str) -> str:
    """A ``--config`` value -> a file path (a ``:argument`` suffix is kept)."""
    path, sep, arg = spec.partition(":")
    if os.path.isfile(path):
        return spec
    name = path[:-3] if path.endswith(".py") else path
    if name in available_configs():
        return os.path.join(PACKAGED_DIR, f"{name}.py") + sep + arg
    near = difflib.get_close_matches(os.path.basename(name), available_configs(), n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(
        f"--config={spec}: no such file, and no packaged config named "
        f"{name!r}{hint}; packaged configs: {', '.join(available_configs())}"
    )


def _split_config_args(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """(the --config value, [(override path, raw value)], every other argument)."""
    spec, overrides, rest = None, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        key = a.split("=", 1)[0]
        has_value = "=" in a
        if key in ("--config", "-config") or key.startswith(("--config.", "-config.")):
            if has_value:
                value = a.split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"{key}: missing a value")
            if key.lstrip("-") == "config":
                spec = value
            else:
                overrides.append((key.lstrip("-")[len("config.") :], value))
        else:
            rest.append(a)
        i += 1
    return spec, overrides, rest


def _field_paths(node: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(_field_paths(v, prefix + k + "."))
    return out


def check_override_keys(cfg: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
    """Every override names an existing field; otherwise a ``ConfigError`` with the closest."""
    known = _field_paths(cfg)
    for key in keys:
        if key in known:
            continue
        parent = key.rpartition(".")[0]
        siblings = [p for p in known if p.rpartition(".")[0] == parent] or known
        near = difflib.get_close_matches(key, siblings, n=1, cutoff=0.5)
        hint = f"; did you mean --config.{near[0]}?" if near else ""
        raise ConfigError(f"--config.{key}: no such config field{hint}")


def _load_file(path: str) -> ml_collections.ConfigDict:
    file, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("_dgpo_config_check", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def load_config(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """``argv`` (program name first) -> (the locked config, the arguments that are not
    ``--config``'s). Raises ``ConfigError`` for a missing or unknown config, an unknown field
    or a value of the wrong type."""
    spec, overrides, rest = _split_config_args(argv[1:])
    if spec is None:
        raise ConfigError(
            f"--config is required: a packaged config name "
            f"({', '.join(available_configs())}) or a path"
        )
    path = resolve_config_path(spec)
    check_override_keys(_load_file(path), [k for k, _ in overrides])
    parsed = [argv[0], f"--config={path}"] + [f"--config.{k}={v}" for k, v in overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "the run config", flag_values=fv, lock_config=True, sys_argv=parsed
    )
    try:
        fv(parsed)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    return fv.config, [argv[0]] + rest
