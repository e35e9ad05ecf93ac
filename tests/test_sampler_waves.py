"""Host waves, batched ingestion and the two decode paths of the sampler.

The schedule (when the host is called, how many rows a model step computes, which decode path
runs) must never change a rollout: a row's samples depend only on (seed, row id, its own
context). So every schedule is checked against the per-event one (``wave_fraction=0``: a host
call at every turn end, the sampler's behaviour before waves), token for token, on sampled
rollouts whose rows end their turns at different steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dgpo_jax
from dgpo_jax.models.qwen2 import forward_with_cache, init_cache
from dgpo_jax.retrieval.documents import Document
from dgpo_jax.retrieval.formatting import information_observation
from dgpo_jax.sampler import Sampler
from dgpo_jax.sampler import loop as loop_module
from dgpo_jax.sampler.host import RolloutRetrievalError, prepare_prompts, prompt_widths
from tests.test_sampler import (
    ANSWERING,
    STUDENT_ALPHA,
    TEACHER_BETA,
    TOK,
    VOCAB,
    ScriptedRetriever,
    config,
    make_chain_model,
)

MAX_TURNS = 4
PROMPTS = ["where is zorp?", "tell me now!", "who is x?", "is it zorp now?"] * 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name, chain, layers, seed in (
        ("answering", ANSWERING, 2, 1),
        ("student", STUDENT_ALPHA, 2, 2),
        ("teacher", TEACHER_BETA, 3, 3),
    ):
        path = tmp_path_factory.mktemp(name)
        make_chain_model(path, chain, layers=layers, seed=seed)
        out[name] = dgpo_jax.load_hf(str(path), dtype="float32")
    return out


def wave_config(**overrides):
    base = dict(
        greedy=False,
        temperature=1.0,
        max_turns=MAX_TURNS,
        cache_len=768,
        max_obs_length=64,
        ingest_chunk=16,
    )
    return config(**{**base, **overrides})


def assert_same_rollout(out, ref):
    a, b = out.arrays, ref.arrays
    for name in ("tokens", "length", "loss_mask", "teacher_mask", "turn_ids", "num_turns"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    np.testing.assert_array_equal(a.num_searches, b.num_searches)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert out.finish_reasons == ref.finish_reasons
    assert out.queries == ref.queries and out.turn_texts == ref.turn_texts


def test_decode_layers_and_windows_by_path_and_platform(monkeypatch):
    """``decode_layers="auto"``: split on the cpu path and on GPUs (docs/gpu.md: XLA:GPU copies
    each layer's slice of stacked weights and cache), scan on the accelerator path elsewhere (a
    TPU, or that path forced on CPU); an explicit choice wins everywhere. The key windows of a
    GPU's split layers; the Pallas decode kernel's settings."""
    auto, scan = wave_config(), wave_config(decode_layers="scan")
    expected = {
        ("cpu", "cpu"): "split",
        ("cpu", "accelerator"): "scan",
        ("gpu", "accelerator"): "split",
        ("tpu", "accelerator"): "scan",
    }
    for (platform, path), layers in expected.items():
        monkeypatch.setattr(loop_module.jax, "default_backend", lambda p=platform: p)
        assert loop_module.resolve_decode_layers(auto, path) == layers, (platform, path)
        assert loop_module.resolve_decode_layers(scan, path) == "scan"
    assert loop_module.resolve_decode_path(auto) == "accelerator"  # tpu, the last set
    # Key windows: every span bucket, or on a GPU with split layers those up to a third of the
    # cache, then the whole cache (a narrower window is copied there, docs/gpu.md).
    sizes = dict(batch=4, prompt_width=16, prefix_width=1, path="accelerator", teacher=None)
    for cache_len, narrow in (
        (768, (128, 192, 256, 768)),
        (8704, (128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 8704)),
    ):
        cfg = wave_config(cache_len=cache_len)
        loop = loop_module.SamplerLoop(model=None, config=cfg, plan=None, **sizes)
        assert loop.windows == loop_module.span_buckets(cache_len)
        loop = loop_module.SamplerLoop(
            model=None, config=cfg, plan=None, narrow_windows=True, **sizes
        )
        assert loop.windows == narrow
    # The Pallas decode kernels read a per-layer cache: split layers, on the accelerator path.
    for kernel in ("pallas", "fused"):
        pallas = wave_config(decode_attention=kernel)
        assert loop_module.resolve_decode_layers(pallas, "accelerator") == "split"
        for bad in (dict(decode_layers="scan"), dict(decode_path="cpu")):
            match = f"decode_attention='{kernel}' runs on the accelerator"
            with pytest.raises(ValueError, match=match):
                wave_config(decode_attention=kernel, **bad)
    # The chunk kernel steps all rows (the accelerator path).
    with pytest.raises(ValueError, match="chunk_attention='pallas' runs on the accelerator"):
        wave_config(chunk_attention="pallas", decode_path="cpu")


def test_wave_schedules_and_decode_paths_give_the_per_event_rollout(models, monkeypatch):
    model_config, params = models["answering"]
    ref = Sampler(model_config, wave_config(wave_fraction=0.0), TOK, ScriptedRetriever())
    ref = ref.generate(params, PROMPTS, seed=5)
    # The rows end their turns at different steps and take different numbers of turns.
    assert len(set(ref.arrays.num_turns.tolist())) >= 3
    assert {"answer", "max_turns"} <= set(ref.finish_reasons)
    calls = {}
    for name, overrides in (
        ("default waves", {}),
        ("wait for all", dict(wave_fraction=1.0)),
        ("max wait 2 steps", dict(wave_fraction=1.0, wave_max_wait=2)),
        ("accelerator path, split layers", dict(decode_path="accelerator", decode_layers="split")),
        (  # the Pallas GPU decode kernel and the TPU chunk kernel, interpreted on CPU
            "accelerator path, pallas attention",
            dict(decode_path="accelerator", decode_attention="pallas", chunk_attention="pallas"),
        ),
    ):
        retriever = ScriptedRetriever()
        out = Sampler(model_config, wave_config(**overrides), TOK, retriever).generate(
            params, PROMPTS, seed=5
        )
        assert_same_rollout(out, ref)
        calls[name] = out.stats["host_calls"]
        assert out.stats["waves"] == out.stats["host_calls"]
    # What a GPU runs (the platform forced): split layers and caches, and key windows up to a
    # third of the cache, then the whole cache; what a TPU runs: the accelerator path scanned,
    # an ingest step's output columns written by a select (the model's steps stay CPU's here).
    for platform, layers in (("gpu", "split"), ("tpu", "scan")):
        with monkeypatch.context() as m:
            m.setattr(loop_module, "compile_platform", lambda plan=None, p=platform: p)
            out = Sampler(model_config, wave_config(), TOK, ScriptedRetriever()).generate(
                params, PROMPTS, seed=5
            )
        assert (out.stats["decode_path"], out.stats["decode_layers"]) == ("accelerator", layers)
        assert_same_rollout(out, ref)
    # Host calls: one per turn end at wave_fraction 0; at most 2 x max_turns + 2 in waves.
    assert ref.stats["host_calls"] > calls["default waves"] >= calls["wait for all"]
    assert calls["default waves"] <= 2 * MAX_TURNS + 2
    assert calls["wait for all"] <= MAX_TURNS + 1  # one per turn level
    assert calls["max wait 2 steps"] > calls["wait for all"]
    # The host receives each waiting row's last turn: need, allowed (bool), row index and turn
    # length (int32), and the turn's tokens (int32, max_new_tokens_per_turn = 12 of them).
    per_call = len(PROMPTS) * (1 + 1 + 4 + 4 + 12 * 4)
    assert ref.stats["bytes_to_host"] == ref.stats["host_calls"] * per_call


def test_waves_with_teacher_turns_and_prefixes(models):
    """Guided-OPD teacher turns (the teacher's own cache) and TrOPD prefixes: a wave schedule,
    with prefill and observation chunks attended by the Pallas chunk kernel (TPUs' form), equals
    the per-event rollout. (On the accelerator path: one compile; the cpu path with a
    teacher runs in waves in test_sampler's Guided-OPD test, against transformers.)"""
    student_config, student_params = models["student"]
    teacher_config, teacher_params = models["teacher"]
    prompts = PROMPTS[:8]
    prefixes = [TOK.encode("<search>be"), None] * 4
    cfg = wave_config(max_prefix_length=4, teacher_turn_prob=0.5, decode_path="accelerator")

    def run(**overrides):
        sampler = Sampler(
            student_config,
            cfg.replace(**overrides),
            TOK,
            ScriptedRetriever(),
            teacher_config=teacher_config,
        )
        return sampler.generate(
            student_params, prompts, seed=2, teacher_params=teacher_params, prefixes=prefixes
        )

    ref = run(wave_fraction=0.0)
    assert ref.arrays.teacher_mask.any() and ref.arrays.loss_mask.any()
    assert ref.arrays.teacher_mask[0, :2].all()  # the prefix
    # (with the TPU's chunk kernel over both caches, interpreted: the same rollout)
    out = run(wave_fraction=0.75, chunk_attention="pallas")
    assert_same_rollout(out, ref)
    assert out.stats["host_calls"] < ref.stats["host_calls"]


@pytest.mark.parametrize("window", [None, 64])
def test_batched_ingestion_equals_one_row_at_a_time(models, window):
    """Appending observations of rows at different lengths in one ``[M, C]`` step (the rows
    gathered out of the batch, or all rows with a mask and one static key window) leaves the
    same cache and next-token logits as appending them one row at a time."""
    model_config, params = models["answering"]
    rng = np.random.RandomState(0)
    batch, chunk = 4, 6
    cache = init_cache(model_config, batch, 64)
    lengths = [9, 3, 7, 5]
    prompt = np.zeros((batch, 9), np.int32)
    prompt_mask = np.zeros((batch, 9), bool)
    for row, n in enumerate(lengths):  # left-padded prompts of different lengths
        prompt[row, 9 - n :] = rng.randint(16, 100, n)
        prompt_mask[row, 9 - n :] = True
    _, cache = forward_with_cache(model_config, params, jnp.asarray(prompt), cache, prompt_mask)
    obs = rng.randint(16, 100, (batch, chunk)).astype(np.int32)
    obs_mask = np.arange(chunk)[None] < np.array([[6], [2], [4], [0]])  # row 3 is not ingesting
    rows = np.array([0, 1, 2], np.int32)
    step = jax.jit(
        lambda c, ids, mask, rows: forward_with_cache(model_config, params, ids, c, mask, rows=rows)
    )
    # One row at a time.
    single = cache
    single_logits = {}
    for row in rows:
        logits, single = step(single, obs[row : row + 1], obs_mask[row : row + 1], np.array([row]))
        single_logits[row] = np.asarray(logits[0, obs_mask[row].sum() - 1])
    # All at once.
    if window is None:  # the cpu path: the ingesting rows gathered, plus a dummy row
        gathered = np.array([0, 1, 2, batch], np.int32)
        logits, batched = step(cache, obs, obs_mask, gathered)
    else:  # the accelerator path: every row, masked, one static window
        logits, batched = jax.jit(
            lambda c: forward_with_cache(
                model_config, params, jnp.asarray(obs), c, obs_mask, window=window
            )
        )(cache)
    for row in rows:
        got = np.asarray(logits[row, obs_mask[row].sum() - 1])
        np.testing.assert_allclose(got, single_logits[row], atol=2e-5)
    for name in ("valid", "end", "next_pos"):
        np.testing.assert_array_equal(getattr(batched, name), getattr(single, name), err_msg=name)
    valid = np.asarray(single.valid)  # slots holding real tokens (others may hold scratch)
    for buf in ("k", "v"):
        a, b = np.asarray(getattr(batched, buf)), np.asarray(getattr(single, buf))
        np.testing.assert_allclose(
            a.transpose(1, 3, 0, 2, 4)[valid], b.transpose(1, 3, 0, 2, 4)[valid], atol=2e-5
        )
    assert list(np.asarray(batched.end)) == [9 + 6, 9 + 2, 9 + 4, 9]


class DocumentRetriever:
    """A retriever with ``retrieve`` (documents): a query with "none" gets no document, one with
    "one" a single document, others `topk`."""

    topk = 3

    def retrieve(self, queries, topk=None):
        topk = topk or self.topk
        out = []
        for q in queries:
            n = 0 if "none" in q else 1 if "one" in q else topk
            out.append([Document(str(i), f"{q} {i}\nabout {q}") for i in range(n)])
        return out

    def search(self, queries, topk=None):  # pragma: no cover - the sampler uses retrieve
        raise AssertionError("retrieve() should be used when a retriever has it")


def test_short_and_empty_results_are_formatted_as_the_reference_and_counted(models):
    model_config, params = models["answering"]
    cfg = config(max_turns=1, max_obs_length=300)
    prefixes = [TOK.encode("<search>none</search>"), TOK.encode("<search>one</search>")]
    prefixes.append(TOK.encode("<search>zorp</search>"))
    out = Sampler(model_config, cfg.replace(max_prefix_length=24), TOK, DocumentRetriever())
    out = out.generate(params, ["x?"] * 3, prefixes=prefixes)
    assert out.stats["empty_results"] == 1 and out.stats["short_results"] == 1
    expected = {
        0: "\n\n<information></information>\n\n",  # the reference's empty result
        1: "\n\n<information>Doc 1(Title: one 0) about one</information>\n\n",
        2: information_observation(
            "".join(f"Doc {i + 1}(Title: zorp {i}) about zorp\n" for i in range(3))
        ),
    }
    for row, text in expected.items():
        assert text in TOK.decode(out.response_ids(row))
        assert out.arrays.num_searches[row] == 1


def test_retriever_failure_stops_the_rollout_naming_the_rows_or_finishes_them(models):
    model_config, params = models["answering"]
    prompts = ["where is zorp?", "tell me!", "x?"]
    cfg = config()
    # A failure then a success: the retry hides it.
    flaky = ScriptedRetriever(fail_calls={0})
    out = Sampler(model_config, cfg, TOK, flaky).generate(params, prompts)
    reference = Sampler(model_config, cfg, TOK, ScriptedRetriever()).generate(params, prompts)
    assert_same_rollout(out, reference)
    # Failing on every attempt: the rollout raises, naming the retriever and the waiting rows.
    with pytest.raises(
        RolloutRetrievalError,
        match=r"after 2 attempt\(s\) at ScriptedRetriever for 2 waiting row\(s\) \[0, 2\]: "
        r"ConnectionError: retrieval server unreachable",
    ):
        Sampler(model_config, cfg, TOK, ScriptedRetriever(fail_calls={0, 1})).generate(
            params, prompts
        )
    # on_retriever_error="finish": those rows finish with retriever_error, never with an empty
    # observation; the others go on.
    out = Sampler(
        model_config,
        cfg,
        TOK,
        ScriptedRetriever(fail_calls={0, 1}),
        on_retriever_error="finish",
    ).generate(params, prompts)
    assert out.finish_reasons == ["retriever_error", reference.finish_reasons[1], "retriever_error"]
    for row in (0, 2):
        assert out.errors[row].startswith("ConnectionError: retrieval server unreachable")
        assert out.arrays.num_searches[row] == 0
        assert out.arrays.length[row] == len(TOK.encode("<search>zorp</search>"))
    np.testing.assert_array_equal(out.response_ids(1), reference.response_ids(1))


def test_prompts_are_padded_to_a_few_widths():
    """A run compiles the rollout once per prompt width: widths are 16, 24, 32, 48, ... (two
    per doubling, at most 1.5x padding), capped at max_prompt_length."""
    assert prompt_widths(100) == (16, 24, 32, 48, 64, 96, 100)
    assert prompt_widths(4096)[-3:] == (2048, 3072, 4096) and len(prompt_widths(4096)) == 17
    cfg = config(max_prompt_length=100, cache_len=384)
    for longest, width in ((1, 16), (16, 16), (17, 24), (49, 64), (97, 100), (100, 100)):
        ids, mask, active = prepare_prompts([[5] * longest, [6] * 3], cfg, vocab_size=VOCAB)
        assert ids.shape == (2, width) and mask.sum() == longest + 3 and active.all()
        assert mask[0, -longest:].all() and mask[1, -3:].all() and not mask[1, :-3].any()


def test_writing_columns_by_select_or_update_equals_numpy_with_the_update_clamped():
    # A decode step writes one column a row as a select (a per-row update is a loop over the
    # rows on TPUs), an ingest step on TPUs several by a select too (``select``), elsewhere by
    # a per-row dynamic_update_slice. All against NumPy, with starts near the buffer's end
    # clamped into it as dynamic_update_slice clamps them.
    rng = np.random.default_rng(0)
    buf = rng.integers(0, 100, (5, 6)).astype(np.int32)
    start = np.array([0, 3, 5, 7, 2], np.int32)  # 7: past the end, written at column 6 - width
    for width in (1, 2, 4):
        values = rng.integers(100, 200, (5, width)).astype(np.int32)
        want = buf.copy()
        for row in range(5):
            col = min(start[row], 6 - width)
            want[row, col : col + width] = values[row]
        for select in (False, True):
            got = loop_module._write(
                jnp.asarray(buf), jnp.asarray(values), jnp.asarray(start), select=select
            )
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{width} {select}")
    floats = loop_module._write(jnp.zeros((2, 3)), jnp.array([[True], [False]]), jnp.array([1, 2]))
    np.testing.assert_array_equal(np.asarray(floats), [[0, 1, 0], [0, 0, 0]])
