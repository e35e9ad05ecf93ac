"""The compiled multi-turn search sampler, against transformers and hand-written expectations.

The models here are tiny transformers Qwen2 models whose weights are edited so that greedy
decoding follows a scripted chain of tokens ("after '?' say '<search>', after '<search>' say
'zorp', ..."): the embedding dominates the residual stream and the LM head maps each chain
token's embedding direction to its successor, while attention and MLP (random) still make the
logits depend on the whole context. The tokenizer is a small longest-match piece tokenizer in
which ``</search>`` is TWO tokens (``</sea`` + ``rch>``) and ``</answer>`` one.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dgpo_jax
from dgpo_jax.models import qwen2
from dgpo_jax.models.qwen2 import forward_with_cache, init_cache
from dgpo_jax.parallel.sharding import plan_from_config
from dgpo_jax.retrieval.formatting import INVALID_ACTION_NOTICE
from dgpo_jax.sampler import Sampler, SamplerConfig, stop_sequences_for
from dgpo_jax.sampler.loop import rollout_program, sub_batch_sizes
from dgpo_jax.sampler.sampling import sampling_logprobs
from dgpo_jax.sampler.stops import ends_with_any
from tests.conftest import make_hf_model

VOCAB = 128
PIECES = [
    "<pad>",
    "<eos>",
    "<search>",
    "</sea",
    "rch>",
    "<answer>",
    "</answer>",
    "<information>",
    "</information>",
    "zorp",
    "paris",
    "hello",
    "alpha",
    "beta",
    "Doc",
    "Title",
]
PIECES += [chr(c) for c in range(32, 127)] + ["\n"]
PIECES += [f"<u{i}>" for i in range(len(PIECES), VOCAB)]  # the rest of the model's vocabulary


class PieceTokenizer:
    """Greedy longest-match over a fixed piece list; decode concatenates (exact round trip)."""

    def __init__(self):
        self.pieces = list(PIECES)
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.eos_token_id, self.pad_token_id = 1, 0

    def encode(self, text, add_special_tokens=False):
        out, i = [], 0
        while i < len(text):
            best = max((p for p in self.pieces if text.startswith(p, i)), key=len)
            out.append(self.ids[best])
            i += len(best)
        return out

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.pieces[int(i)] for i in ids)

    def get_vocab(self):
        return dict(self.ids)


TOK = PieceTokenizer()
ANSWERING = {
    "?": "<search>",
    "<search>": "zorp",
    "zorp": "</sea",
    "</sea": "rch>",
    "\n": "<answer>",
    "<answer>": "paris",
    "paris": "</answer>",
    "!": "hello",
    "hello": "<eos>",
}
ALWAYS_SEARCH = {**ANSWERING, "\n": "<search>"}
STUDENT_ALPHA = {
    "?": "<search>",
    "\n": "<search>",
    "<search>": "alpha",
    "alpha": "</sea",
    "</sea": "rch>",
}
TEACHER_BETA = {
    "?": "<search>",
    "\n": "<search>",
    "<search>": "beta",
    "beta": "</sea",
    "</sea": "rch>",
}


def make_chain_model(path, chain, *, layers=2, hidden=64, seed=0, strength=0.64):
    """A tiny HF Qwen2 whose greedy path follows `chain` (token -> next token); returns it."""
    hf = make_hf_model(path, vocab=VOCAB, hidden=hidden, layers=layers, std=0.1, seed=seed)
    rng = np.random.RandomState(seed + 100)
    emb = rng.randn(VOCAB, hidden) * 3.0
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    head = rng.randn(VOCAB, hidden) * 0.01
    for current, following in chain.items():
        head[TOK.ids[following]] += strength * unit[TOK.ids[current]]
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(torch.tensor(emb, dtype=torch.float32))
        hf.lm_head.weight.copy_(torch.tensor(head, dtype=torch.float32))
        hf.model.norm.weight.fill_(1.0)
        for layer in hf.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    hf.save_pretrained(str(path))
    return hf


class ScriptedRetriever:
    """One fixed document per query; records every call. Fails the calls listed in `fail_calls`."""

    def __init__(self, fail_calls=()):
        self.calls = []
        self.fail_calls = set(fail_calls)

    def search(self, queries):
        self.calls.append(list(queries))
        if len(self.calls) - 1 in self.fail_calls:
            raise ConnectionError("retrieval server unreachable (scripted failure)")
        return [f"Doc 1(Title: {q}) {q} is in paris\n" for q in queries]


def observation_text(query):
    return f"\n\n<information>Doc 1(Title: {query}) {query} is in paris</information>\n\n"


# The decode path: "auto" (the cpu path on this machine) where the test's subject is what the
# cpu path does differently (sub-batches, key windows, chunked ingestion, the teacher's and the
# prefixes' caches, a sharded cache); the scanned accelerator path, whose program compiles ~3x
# faster, where the subject is the rollout's bookkeeping (budgets, turns, seeds, long prompts).
# Both paths are checked against transformers here and against each other in test_sampler_waves.
SCANNED = "accelerator"


def config(**overrides):
    base = dict(
        stop_sequences_for(TOK),
        cache_len=384,
        max_prompt_length=32,
        max_obs_length=300,
        max_new_tokens_per_turn=12,
        max_new_tokens=96,
        max_turns=4,
        greedy=True,
        ingest_chunk=1,
    )
    base.update(overrides)
    return SamplerConfig(**base)


def hf_logprobs(hf, ids):
    """log-softmax of transformers' logits for one unpadded sequence ``[T] -> [T, V]``."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([list(ids)])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def check_logprobs_against_hf(hf, out, row, mask, atol=2e-4):
    """The sampler's log-probs at the tokens in `mask` equal a fresh transformers forward of the
    whole sequence (prompt + response)."""
    prompt = out.prompt_ids[row][out.prompt_mask[row]]
    response = out.response_ids(row)
    ref = hf_logprobs(hf, np.concatenate([prompt, response]))
    positions = np.flatnonzero(mask[: len(response)])
    assert len(positions) > 0
    expected = ref[len(prompt) - 1 + positions, response[positions]]
    got = out.arrays.logprobs[row, positions]
    np.testing.assert_allclose(got, expected, atol=atol)
    return expected


@pytest.fixture(scope="module")
def chain_models(tmp_path_factory):
    out = {}
    for name, chain, layers, seed in (
        ("answering", ANSWERING, 2, 0),
        ("always_search", ALWAYS_SEARCH, 2, 1),
        ("student", STUDENT_ALPHA, 2, 2),
        ("teacher", TEACHER_BETA, 3, 3),
    ):
        path = tmp_path_factory.mktemp(name)
        hf = make_chain_model(path, chain, layers=layers, seed=seed)
        model_config, params = dgpo_jax.load_hf(str(path), dtype="float32")
        out[name] = (hf, model_config, params)
    return out


# ----------------------------------------------------------------------------------------------
# Greedy single turn vs transformers generate
# ----------------------------------------------------------------------------------------------
def test_greedy_single_turn_matches_transformers_generate(tmp_path):
    hf = make_hf_model(tmp_path, vocab=VOCAB, std=0.3, seed=3)
    model_config, params = dgpo_jax.load_hf(str(tmp_path), dtype="float32")
    rng = np.random.RandomState(1)
    prompts = [rng.randint(16, VOCAB, n).tolist() for n in (8, 5, 3)]
    width = 8
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    n_new = 20
    with torch.no_grad():
        free = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=n_new,
            do_sample=False,
            pad_token_id=0,
        )[:, width:].numpy()
    eos = int(free[0, 6])  # row 0 stops at its first occurrence of this token
    with torch.no_grad():
        gen = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=n_new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
            output_scores=True,
            return_dict_in_generate=True,
        )
    ref = gen.sequences[:, width:].numpy()
    ref_logprobs = torch.stack([torch.log_softmax(s.double(), -1) for s in gen.scores], 1).numpy()
    cfg = config(
        max_turns=0,
        max_new_tokens_per_turn=n_new,
        eos_token_ids=(eos,),
        search_stops=((VOCAB - 1, VOCAB - 1, VOCAB - 1),),
        answer_stops=(),
        eos_ends_trajectory=True,
    )
    out = Sampler(model_config, cfg, TOK, ScriptedRetriever()).generate(params, prompts)
    for row in range(3):
        hits = np.flatnonzero(ref[row] == eos)
        n = hits[0] + 1 if len(hits) else n_new
        np.testing.assert_array_equal(out.response_ids(row), ref[row, :n])
        np.testing.assert_allclose(
            out.arrays.logprobs[row, :n], ref_logprobs[row, np.arange(n), ref[row, :n]], atol=1e-4
        )
        assert out.arrays.loss_mask[row, :n].all() and not out.arrays.loss_mask[row, n:].any()
        assert (out.arrays.turn_ids[row, :n] == 0).all() and (
            out.arrays.turn_ids[row, n:] == -1
        ).all()
        assert out.finish_reasons[row] == ("eos" if len(hits) else "max_turns")
    assert out.finish_reasons[0] == "eos" and len(np.unique(ref)) > 8  # a varied path


# ----------------------------------------------------------------------------------------------
# The search loop: observation placement, KV cache after insertion, invalid action
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 8])
def test_search_observation_and_cache_match_fresh_forward(chain_models, chunk):
    hf, model_config, params = chain_models["answering"]
    retriever = ScriptedRetriever()
    prompts = ["where is zorp?", "tell me!", "x?", "why?"] * 2  # shared with the sharding test
    # chunk 8 on the cpu path (its program is shared with the sharding test), chunk 1 scanned
    path = "auto" if chunk > 1 else SCANNED
    out = Sampler(
        model_config, config(ingest_chunk=chunk, decode_path=path), TOK, retriever
    ).generate(params, prompts)
    search_turn = TOK.encode("<search>zorp</search>")
    assert len(TOK.encode("</search>")) == 2  # the stop tag spans two tokens
    answer_turn = TOK.encode("<answer>paris</answer>")
    observation = TOK.encode(observation_text("zorp"))
    notice = TOK.encode(INVALID_ACTION_NOTICE)
    assert retriever.calls == [["zorp"] * 6]  # one batched call for all searching rows
    a = out.arrays
    for row in (0, 2):
        expected = search_turn + observation + answer_turn
        np.testing.assert_array_equal(out.response_ids(row), expected)
        n1, n2 = len(search_turn), len(search_turn) + len(observation)
        np.testing.assert_array_equal(
            a.loss_mask[row, : len(expected)],
            [1] * n1 + [0] * len(observation) + [1] * len(answer_turn),
        )
        assert not a.teacher_mask[row].any()
        np.testing.assert_array_equal(
            a.turn_ids[row, : len(expected)], [0] * n2 + [1] * len(answer_turn)
        )
        assert a.logprobs[row, n1:n2].tolist() == [0.0] * len(observation)
        assert out.queries[row] == ["zorp"] and out.answers[row] == "paris"
        assert out.finish_reasons[row] == "answer" and a.num_searches[row] == 1
        assert a.num_turns[row] == 2 and a.generated[row] == len(search_turn) + len(answer_turn)
        expected_lp = check_logprobs_against_hf(hf, out, row, a.loss_mask[row])
        # The check is sensitive: without the observation the continuation's log-probs differ.
        prompt = out.prompt_ids[row][out.prompt_mask[row]]
        wrong = hf_logprobs(hf, np.concatenate([prompt, search_turn, answer_turn]))
        wrong_lp = wrong[len(prompt) + n1 - 1 + np.arange(len(answer_turn)), answer_turn]
        assert np.abs(wrong_lp - expected_lp[-len(answer_turn) :]).max() > 1e-3
    # Row 1: "hello<eos>" has no action -> the invalid-action notice, then an answer.
    expected = TOK.encode("hello<eos>") + notice + answer_turn
    np.testing.assert_array_equal(out.response_ids(1), expected)
    np.testing.assert_array_equal(
        a.loss_mask[1, : len(expected)], [1, 1] + [0] * len(notice) + [1] * len(answer_turn)
    )
    assert out.turn_texts[1] == ["hello<eos>", "<answer>paris</answer>"]
    assert out.queries[1] == [] and a.num_searches[1] == 0 and out.finish_reasons[1] == "answer"
    check_logprobs_against_hf(hf, out, 1, a.loss_mask[1])
    if chunk > 1:
        assert out.stats["ingest_steps"] > 0


def test_max_turns_then_final_turn_without_search(chain_models):
    hf, model_config, params = chain_models["always_search"]
    retriever = ScriptedRetriever()
    out = Sampler(model_config, config(max_turns=2, decode_path=SCANNED), TOK, retriever).generate(
        params, ["where is zorp?"]
    )
    turn = TOK.encode("<search>zorp</search>")
    observation = TOK.encode(observation_text("zorp"))
    np.testing.assert_array_equal(out.response_ids(0), (turn + observation) * 2 + turn)
    assert retriever.calls == [["zorp"], ["zorp"]]  # the final turn's search is not executed
    assert out.finish_reasons == ["max_turns"] and out.queries[0] == ["zorp", "zorp"]
    assert out.arrays.num_searches[0] == 2 and out.arrays.num_turns[0] == 3
    assert out.turn_texts[0] == ["<search>zorp</search>"] * 3
    assert out.arrays.turn_ids[0, : out.arrays.length[0]].max() == 2
    check_logprobs_against_hf(hf, out, 0, out.arrays.loss_mask[0])


def test_update_only_model_settings_share_one_rollout_program(chain_models):
    """remat and the attention kernel are read only by the uncached forward (training,
    scoring): the cached forward gives the same logits with them set, and a Sampler built from a
    config that sets them reuses the plain config's compiled rollout (one program per model
    for a run's rollouts and evaluations) and rolls out the same tokens."""
    hf, model_config, params = chain_models["always_search"]
    trained = model_config.replace(remat="full", attention="chunked", attention_block=4)
    assert trained.for_decoding() == model_config
    ids = jnp.asarray(TOK.encode("where is zorp? <search>zorp</search>"))[None]
    logits = [
        forward_with_cache(c, params, ids, init_cache(c, 1, 64))[0] for c in (model_config, trained)
    ]
    np.testing.assert_array_equal(logits[0], logits[1])

    cfg = config(max_turns=2, decode_path=SCANNED)
    plain = Sampler(model_config, cfg, TOK, ScriptedRetriever()).generate(params, ["where?"])
    programs = rollout_program._cache_size()
    again = Sampler(trained, cfg, TOK, ScriptedRetriever()).generate(params, ["where?"])
    assert rollout_program._cache_size() == programs
    np.testing.assert_array_equal(again.arrays.tokens, plain.arrays.tokens)


def test_observation_truncation_and_budgets(chain_models):
    _, model_config, params = chain_models["answering"]
    # Observations cut to 10 tokens; 6 generated tokens per trajectory.
    out = Sampler(
        model_config,
        config(max_obs_length=10, max_new_tokens=6, decode_path=SCANNED),
        TOK,
        ScriptedRetriever(),
    ).generate(params, ["where is zorp?"])
    n1 = len(TOK.encode("<search>zorp</search>"))
    np.testing.assert_array_equal(
        out.arrays.tokens[0, n1 : n1 + 10], TOK.encode(observation_text("zorp"))[:10]
    )
    np.testing.assert_array_equal(out.arrays.loss_mask[0, : n1 + 12], [1] * n1 + [0] * 10 + [1, 1])
    assert out.finish_reasons == ["max_tokens"] and out.arrays.generated[0] == 6
    assert out.arrays.length[0] == n1 + 10 + 2
    # Context: the observation does not fit in cache_len -> context_full, nothing half-ingested.
    out = Sampler(
        model_config, config(cache_len=40, decode_path=SCANNED), TOK, ScriptedRetriever()
    ).generate(params, ["where is zorp?"])
    assert out.finish_reasons == ["context_full"]
    assert out.arrays.length[0] == n1 and out.queries[0] == ["zorp"]


def test_batch_rollout_equals_each_row_alone_across_key_windows(chain_models):
    """Rows end their turns at different steps, so decode steps run on shrinking sub-batches
    (8 rows, then 4 with dummy rows in the places of finished ones) and contexts grow past
    several key windows (128, 192, 256 slots): every row's greedy rollout equals that row rolled
    out alone, and transformers' log-probs."""
    hf, model_config, params = chain_models["always_search"]
    sampler = Sampler(model_config, config(max_turns=3), TOK, ScriptedRetriever())
    # First turns of 4 ("?": a search), 2 ("!": hello<eos>; "zorp": </search>, both invalid
    # actions, then the long invalid-action notice) and 5 tokens ("</sea"); all 9-16 tokens.
    prompts = ["where is zorp?", "tell me now!", "where is zorp", "who is x?", "what is </sea"]
    prompts += ["say hello now!", "it is a zorp", "is it zorp now?"]
    batch = sampler.generate(params, prompts)
    width = batch.prompt_ids.shape[1]
    ends = width + batch.arrays.length
    assert len(set(batch.arrays.generated.tolist())) >= 3 and ends.max() > 256
    for row, prompt in enumerate(prompts):
        alone = sampler.generate(params, [prompt])
        assert alone.prompt_ids.shape == (1, width)  # same slots as in the batch
        np.testing.assert_array_equal(alone.response_ids(0), batch.response_ids(row))
        np.testing.assert_allclose(alone.arrays.logprobs[0], batch.arrays.logprobs[row], atol=1e-5)
        assert alone.finish_reasons[0] == batch.finish_reasons[row]
        assert alone.queries[0] == batch.queries[row]
    longest = int(np.argmax(ends))
    check_logprobs_against_hf(hf, batch, longest, batch.arrays.loss_mask[longest])


# ----------------------------------------------------------------------------------------------
# Mixed rollouts
# ----------------------------------------------------------------------------------------------
def _turn_spans(out, row):
    """{turn: positions of its generated tokens} from loss/teacher masks and turn ids."""
    a = out.arrays
    n = a.length[row]
    written = a.loss_mask[row, :n] | a.teacher_mask[row, :n]
    spans = {}
    for pos in np.flatnonzero(written):
        spans.setdefault(int(a.turn_ids[row, pos]), []).append(pos)
    return spans


def test_guided_opd_teacher_turns_are_marked(chain_models):
    hf_s, student_config, student_params = chain_models["student"]
    hf_t, teacher_config, teacher_params = chain_models["teacher"]
    cfg = config(max_turns=3, teacher_turn_prob=0.5)
    sampler = Sampler(student_config, cfg, TOK, ScriptedRetriever(), teacher_config=teacher_config)
    prompts = ["where is zorp?"] * 8
    out = sampler.generate(student_params, prompts, seed=3, teacher_params=teacher_params)
    kinds = []
    for row in range(8):
        a = out.arrays
        spans = _turn_spans(out, row)
        assert sorted(spans) == [0, 1, 2, 3]
        for _turn, positions in spans.items():
            text = TOK.decode(a.tokens[row, positions])
            teacher_wrote = a.teacher_mask[row, positions]
            assert text in ("<search>alpha</search>", "<search>beta</search>")
            by_teacher = "beta" in text
            assert teacher_wrote.all() == by_teacher and teacher_wrote.any() == by_teacher
            assert a.loss_mask[row, positions].all() == (not by_teacher)
            kinds.append(by_teacher)
        assert out.queries[row] == [TOK.decode(a.tokens[row, spans[t][1:2]]) for t in range(3)]
        # Each model's tokens have that model's log-probs on the shared context (both caches).
        check_logprobs_against_hf(hf_s, out, row, a.loss_mask[row])
        if a.teacher_mask[row].any():
            check_logprobs_against_hf(hf_t, out, row, a.teacher_mask[row])
    assert 0 < sum(kinds) < len(kinds)  # both writers occur at p = 0.5
    # p = 1: the teacher writes everything, nothing to train on.
    # (a runtime probability: same compiled program).
    out = sampler.generate(
        student_params, prompts, seed=3, teacher_params=teacher_params, teacher_turn_prob=1.0
    )
    assert not out.arrays.loss_mask.any() and out.arrays.teacher_mask.sum() == 8 * 4 * 4


def test_teacher_prefix_is_continued_and_marked(chain_models):
    hf, model_config, params = chain_models["answering"]
    prefix = TOK.encode("<search>zorp")
    out = Sampler(
        model_config, config(max_prefix_length=4, ingest_chunk=1), TOK, ScriptedRetriever()
    ).generate(params, ["where is zorp?", "x?"], prefixes=[prefix, None])
    a = out.arrays
    np.testing.assert_array_equal(out.response_ids(0)[:4], TOK.encode("<search>zorp</search>"))
    np.testing.assert_array_equal(a.teacher_mask[0, :4], [1, 1, 0, 0])
    np.testing.assert_array_equal(a.loss_mask[0, :4], [0, 0, 1, 1])
    assert out.turn_texts[0][0] == "<search>zorp</search>" and out.queries[0] == ["zorp"]
    assert out.finish_reasons == ["answer", "answer"] and not a.teacher_mask[1].any()
    check_logprobs_against_hf(hf, out, 0, a.loss_mask[0])


# ----------------------------------------------------------------------------------------------
# Sampling and seeds
# ----------------------------------------------------------------------------------------------
def _numpy_sampling_logprobs(logits, temperature, top_k, top_p):
    x = logits / temperature
    out = np.full_like(x, -np.inf)
    for b in range(x.shape[0]):
        order = np.argsort(-x[b], kind="stable")
        keep = order[:top_k] if top_k else order
        p = np.exp(x[b, keep] - x[b, keep].max())
        p /= p.sum()
        cum = np.cumsum(p)
        n = int(np.searchsorted(cum, top_p) + 1) if top_p < 1 else len(keep)
        chosen = keep[:n]
        z = (
            x[b, chosen]
            - np.log(np.exp(x[b, chosen] - x[b, chosen].max()).sum())
            - x[b, chosen].max()
        )
        out[b, chosen] = z
    return out


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.6), (0.8, 10, 0.9)]
)
def test_sampling_distribution_matches_numpy(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(4, 50).astype(np.float32) * 2
    cfg = config(greedy=False, temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.asarray(sampling_logprobs(cfg, jnp.asarray(logits)))
    ref = _numpy_sampling_logprobs(logits.astype(np.float64), temperature, top_k, top_p)
    kept = np.isfinite(ref)
    np.testing.assert_array_equal(got > -1e29, kept)
    np.testing.assert_allclose(got[kept], ref[kept], atol=1e-5)


def test_cpu_sub_batch_sizes_halve_down_to_four_rows():
    assert sub_batch_sizes(32) == (32, 16, 8, 4)
    assert sub_batch_sizes(8) == (8, 4)
    assert sub_batch_sizes(6) == (6, 4)  # 6 // 2 = 3 is below the smallest size
    assert sub_batch_sizes(4) == (4,) and sub_batch_sizes(3) == (3,) and sub_batch_sizes(1) == (1,)
    assert sub_batch_sizes(8, smallest=1) == (8, 4, 2, 1)
    assert sub_batch_sizes(64, factor=4) == (64, 16, 4)


def test_stop_matching_matches_python_endswith():
    rng = np.random.RandomState(0)
    window = rng.randint(0, 3, (200, 4)).astype(np.int32)
    count = rng.randint(0, 6, 200).astype(np.int32)
    stops = ((1, 2), (0, 0, 1), (2,))
    got = np.asarray(ends_with_any(jnp.asarray(window), jnp.asarray(count), stops))
    for b in range(200):
        seen = window[b, 4 - min(count[b], 4) :].tolist()
        expected = any(len(seen) >= len(s) and tuple(seen[-len(s) :]) == s for s in stops)
        assert got[b] == expected


def test_same_seed_same_rollouts_different_seed_different(tmp_path):
    hf = make_hf_model(tmp_path, vocab=VOCAB, std=0.1, seed=5)
    model_config, params = dgpo_jax.load_hf(str(tmp_path), dtype="float32")
    cfg = config(
        greedy=False,
        temperature=1.0,
        top_k=50,
        max_turns=0,
        max_new_tokens_per_turn=16,
        decode_path=SCANNED,
    )
    sampler = Sampler(model_config, cfg, TOK, ScriptedRetriever())
    prompts = [[20, 21, 22], [30, 31], [40, 41, 42, 43]]
    a = sampler.generate(params, prompts, seed=7).arrays
    b = sampler.generate(params, prompts, seed=7).arrays
    c = sampler.generate(params, prompts, seed=8).arrays
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any(axis=1).all()
    # A row's sample depends on (seed, row id, its context), not on the rest of the batch.
    moved = sampler.generate(params, [[50, 51], prompts[2], [60]], seed=7, row_ids=[5, 2, 6])
    np.testing.assert_array_equal(moved.arrays.tokens[1, :16], a.tokens[2, :16])
    # The recorded log-probs are those of the sampled distribution (top-k 50 at T=1).
    full = np.concatenate([prompts[0], a.tokens[0, :16]])
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(full[None])).logits[0].double().numpy()
    ref = _numpy_sampling_logprobs(logits, 1.0, 50, 1.0)
    np.testing.assert_allclose(
        a.logprobs[0, :16], ref[len(prompts[0]) - 1 + np.arange(16), a.tokens[0, :16]], atol=1e-4
    )


# ----------------------------------------------------------------------------------------------
# Sharding and bad input
# ----------------------------------------------------------------------------------------------
def test_sharded_rollout_equals_single_device(chain_models, monkeypatch):
    _, model_config, params = chain_models["answering"]
    prompts = ["where is zorp?", "tell me!", "x?", "why?"] * 2
    cfg = config(ingest_chunk=8)
    plain = Sampler(model_config, cfg, TOK, ScriptedRetriever()).generate(params, prompts)
    plan = plan_from_config({"data": 2, "fsdp": -1})
    sharded_params = plan.shard_params(model_config, params)
    out = Sampler(model_config, cfg, TOK, ScriptedRetriever(), plan=plan).generate(
        sharded_params, prompts
    )
    np.testing.assert_array_equal(out.arrays.tokens, plain.arrays.tokens)
    np.testing.assert_allclose(out.arrays.logprobs, plain.arrays.logprobs, atol=1e-5)
    assert out.finish_reasons == plain.finish_reasons and out.queries == plain.queries
    # Host calls per batch shard (what several processes do): every shard searches for its own
    # rows (4 of them: data=2 x fsdp=4 over 8 rows, 2 rows each), the rollout is the same. On
    # the scanned path (what a GPU/TPU mesh runs), a second sharded program.
    retriever = ScriptedRetriever()
    per_shard = cfg.replace(host_calls="per_shard", decode_path=SCANNED)
    out = Sampler(model_config, per_shard, TOK, retriever, plan=plan).generate(
        sharded_params, prompts
    )
    np.testing.assert_array_equal(out.arrays.tokens, plain.arrays.tokens)
    assert out.finish_reasons == plain.finish_reasons and out.queries == plain.queries
    assert out.turn_texts == plain.turn_texts
    assert max(len(call) for call in retriever.calls) <= 2  # each shard's own rows
    # The Pallas kernels (interpreted here) under shard_map on each device's rows: JAX's decode
    # kernel with the TPU's chunk kernels, then the fused decode kernel (rotary, cache write,
    # attention) with the GPU's chunk kernel: the same rollout.
    for decode, form in (("pallas", "tpu"), ("fused", "gpu")):
        monkeypatch.setattr(qwen2, "CHUNK_KERNEL_FORM", form)  # (each config its own trace)
        pallas = cfg.replace(decode_path=SCANNED, decode_attention=decode, chunk_attention="pallas")
        out = Sampler(model_config, pallas, TOK, ScriptedRetriever(), plan=plan).generate(
            sharded_params, prompts
        )
        np.testing.assert_array_equal(out.arrays.tokens, plain.arrays.tokens)
        np.testing.assert_allclose(out.arrays.logprobs, plain.arrays.logprobs, atol=1e-5)
        assert out.finish_reasons == plain.finish_reasons and out.queries == plain.queries


def test_prompt_too_long_finishes_only_its_row(chain_models):
    _, model_config, params = chain_models["answering"]
    long_prompt = "where is " + "zorp " * 40 + "?"
    sampler = Sampler(model_config, config(decode_path=SCANNED), TOK, ScriptedRetriever())
    out = sampler.generate(params, ["where is zorp?", long_prompt, "tell me!", "x?"])
    assert out.finish_reasons == ["answer", "prompt_too_long", "answer", "answer"]
    assert out.arrays.length[1] == 0 and out.arrays.generated[1] == 0
    # The other rows are unaffected.
    reference = sampler.generate(params, ["where is zorp?", "why?", "tell me!", "x?"])
    for row in (0, 2, 3):
        np.testing.assert_array_equal(out.response_ids(row), reference.response_ids(row))


def test_bad_inputs_raise_clear_errors(chain_models):
    _, model_config, params = chain_models["answering"]
    sampler = Sampler(model_config, config(), TOK, ScriptedRetriever())
    with pytest.raises(ValueError, match=r"prompts\[1\]: empty prompt"):
        sampler.generate(params, [[5, 6], []])
    with pytest.raises(ValueError, match=r"prompts\[0\]: token id 500 outside the vocabulary"):
        sampler.generate(params, [[500]])
    with pytest.raises(ValueError, match="max_prefix_length is 0"):
        sampler.generate(params, [[5]], prefixes=[[6]])
    with pytest.raises(ValueError, match="must be smaller than cache_len"):
        config(max_prompt_length=384)
    with pytest.raises(ValueError, match="search_stops is empty"):
        SamplerConfig()
    with pytest.raises(ValueError, match="needs a teacher_config"):
        Sampler(model_config, config(teacher_turn_prob=0.5), TOK, ScriptedRetriever())
