"""Test setup: 8 fake CPU devices (before JAX is imported), cheaper CPU compiles, offline HF,
tiny reference models."""

import atexit
import gc
import json
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# The suite is compile-bound (tiny models): skip the expensive LLVM passes (the measurement:
# docs/design.md, 2026-12-02).
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += (
        " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dgpo_jax.models import param_shapes  # noqa: E402

# One persistent compilation cache for the session, in a fresh directory (nothing carries over
# between runs): the tests compile the same tiny programs many times (update steps, scoring,
# init), and a program without host callbacks is then compiled once. Launcher subprocesses use
# it too (dgpo_jax.launch.cli reads DGPO_JAX_COMPILATION_CACHE); a test that must compile from
# scratch sets that variable to "" for its subprocess.
# With pytest-xdist the workers inherit the directory from the controller's environment, so
# they share it (the cache's writes are atomic), and the controller removes it at the end.
_XLA_CACHE = os.environ.get("DGPO_TEST_XLA_CACHE", "")
if not _XLA_CACHE:
    _XLA_CACHE = tempfile.mkdtemp(prefix="dgpo-test-xla-")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
    os.environ["DGPO_TEST_XLA_CACHE"] = _XLA_CACHE
os.environ["DGPO_JAX_COMPILATION_CACHE"] = _XLA_CACHE
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def random_params(config, seed, std=0.02):
    """Random parameters without compiling Flax's init: normal(std) weights, zero biases, unit
    norms, on the model's own parameter tree (``param_shapes``)."""
    r = np.random.default_rng(seed)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.ones(s.shape, s.dtype)
        if "bias" in name:
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(r.normal(0, std, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, param_shapes(config))


def make_hf_model(
    path,
    *,
    tied=False,
    theta=1e6,
    vocab=256,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    ffn=96,
    std=0.1,
    seed=0,
    max_shard_size=None,
):
    """A tiny random transformers Qwen2 model saved to ``path``; returns the torch model."""
    import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)
    import transformers  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    cfg = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        rope_theta=theta,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), **kwargs)
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Four tiny HF checkpoints: tied/untied x theta 1e4/1e6 -> (path, torch model)."""
    out = {}
    for tied in (False, True):
        for theta in (1e4, 1e6):
            path = tmp_path_factory.mktemp(f"hf_tied{int(tied)}_theta{int(theta)}")
            out[(tied, theta)] = (str(path), make_hf_model(path, tied=tied, theta=theta))
    return out


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop each test module's compiled programs when it ends, so the one-process suite holds
    only the current module's (why: docs/design.md, 2026-12-02)."""
    yield
    jax.clear_caches()
    gc.collect()


# Opt-in: DGPO_TEST_COMPILE_REPORT=FILE.json writes, per test, the seconds this process spent
# tracing, lowering to MLIR and compiling XLA programs, and the number of backend compiles (the
# suite is compile-bound: docs/design.md, 2026-12-03). Launcher subprocesses are not counted.
# Under pytest-xdist each worker writes its own file: FILE.gw0.json, FILE.gw1.json, ...
_COMPILE_REPORT = os.environ.get("DGPO_TEST_COMPILE_REPORT")
if _COMPILE_REPORT and os.environ.get("PYTEST_XDIST_WORKER"):
    _COMPILE_REPORT = (
        f"{os.path.splitext(_COMPILE_REPORT)[0]}.{os.environ['PYTEST_XDIST_WORKER']}.json"
    )
_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
}
_compile_totals: dict[str, dict[str, float]] = {}
_current_test = ["(outside tests)"]

if _COMPILE_REPORT:

    def _on_duration(event, duration, **_):
        key = _COMPILE_EVENTS.get(event)
        if key is not None:
            row = _compile_totals.setdefault(_current_test[0], {})
            row[key] = row.get(key, 0.0) + duration
            if key == "compile_s":
                row["compiles"] = row.get("compiles", 0) + 1

    jax.monitoring.register_event_duration_secs_listener(_on_duration)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        _current_test[0] = item.nodeid
        try:
            return (yield)
        finally:
            _current_test[0] = "(outside tests)"

    def pytest_sessionfinish(session, exitstatus):
        rows = sorted(_compile_totals.items(), key=lambda kv: -kv[1].get("compile_s", 0.0))
        with open(_COMPILE_REPORT, "w") as f:
            json.dump({k: {n: round(v, 2) for n, v in r.items()} for k, r in rows}, f, indent=1)
