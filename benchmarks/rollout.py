"""Rollout throughput: the compiled multi-turn sampler vs a transformers turn-by-turn loop.

    python benchmarks/rollout.py [--quick] [--batch 32] [--repeats 2]

Setup (all built here, offline): a synthetic world (dgpo_jax.data.synthetic) with its word
tokenizer, a BM25 index of its corpus searched in process, and a small Qwen2 model whose
weights are edited so that sampling produces agent-like trajectories: after a newline (the end
of the prompt or of an observation) it opens ``<search>`` (70%) or ``<answer>`` (30%), a search
runs ~30 random words until ``</search>``, an answer is one word and ``</answer>``. So rows
search a different number of times with turns of different lengths, as real rollouts do.

Measured, on the same model, prompts, sampling settings (temperature 1) and retriever:
  * ours: `dgpo_jax.sampler.Sampler` (one compiled program, KV cache kept across turns, host
    calls in waves, batched observation ingestion);
  * per-event: the same program with ``wave_fraction=0`` (a host call at every turn end, the
    schedule before waves; the policy is a traced argument, so no recompile);
  * (a) reference loop: transformers ``generate`` per turn with stop sequences, then retrieve,
    re-tokenize the whole context and generate again for the active rows (Search-R1's loop);
  * (b) plain decode: our compiled loop with search disabled, one long turn, as an upper bound.
Throughput = rollout tokens (prompt + generated + observations) / wall seconds. Trajectories
are sampled, so the two systems produce different (statistically alike) rollouts; the token
counts are reported for both. ``--search-latency-ms`` adds a pause to every retriever call
(all systems), standing in for a retrieval server's round trip. Besides the throughput ratios
the JSON reports, for ours and per-event: host calls, model calls (decode and ingest steps, and
the rows they computed), and the bytes the compiled loop sent to the host. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dgpo_jax.data.synthetic import build_word_tokenizer, generate_world
from dgpo_jax.models import get_preset, init_params, save_hf  # noqa: E402
from dgpo_jax.retrieval import InProcessRetriever
from dgpo_jax.retrieval.formatting import (
    INVALID_ACTION_NOTICE,
    information_observation,  # noqa: E402
    parse_action,
)
from dgpo_jax.sampler import Sampler, SamplerConfig, stop_sequences_for  # noqa: E402
from retrieval_service.index import build_index

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import machine  # noqa: E402

log = logging.getLogger("benchmarks.rollout")


def build_world(tmp: str, num_entities: int):
    world = generate_world(0, num_entities)
    tokenizer = build_word_tokenizer(world)
    corpus = os.path.join(tmp, "corpus.jsonl")
    with open(corpus, "w") as handle:
        for row in world.corpus:
            handle.write(json.dumps(row) + "\n")
    build_index(corpus, os.path.join(tmp, "bm25"), "bm25", show_progress=False)
    return world, tokenizer, InProcessRetriever(os.path.join(tmp, "bm25"))


class SlowRetriever:
    """A retriever whose every call takes `latency_s` longer (a remote server's round trip)."""

    def __init__(self, retriever, latency_s: float):
        self.retriever, self.latency_s = retriever, latency_s

    def retrieve(self, queries, topk=None):
        time.sleep(self.latency_s)
        return self.retriever.retrieve(queries, topk)

    def search(self, queries, topk=None):
        time.sleep(self.latency_s)
        return self.retriever.search(queries, topk)


def agent_like_params(model_config, tokenizer, seed=0):
    """Random Qwen2 weights edited into a sampler of search-agent-shaped text (see module doc).

    Residual dimension 0 holds a constant (the embedding writes 30, attention and MLP outputs
    write 0), so after the final norm it carries a near-constant value: LM-head row 0 is then a
    per-token logit bias. The other dimensions carry the current token's embedding, which the
    LM head maps to forced successors (a bigram chain); random attention/MLP add context.
    """
    rng = np.random.RandomState(seed)
    params = jax.tree.map(np.asarray, init_params(model_config, jax.random.key(seed)))
    vocab, dim = model_config.vocab_size, model_config.hidden_size
    ids = tokenizer.get_vocab()
    spoken = {ids[t] for t in ("<search>", "</search>", "<answer>", "</answer>")}
    special = {ids[t] for t in tokenizer.all_special_tokens} - spoken
    emb = rng.randn(vocab, dim).astype(np.float32) * 3.0
    emb[:, 0] = 30.0
    params["embed_tokens"] = emb
    layers = params["layers"]
    scale = 5.0 * np.sqrt(64.0 / dim)  # attention/MLP add context without drowning the token
    for group, name in (("attn", "o_kernel"), ("mlp", "down_kernel")):
        layers[group][name] = layers[group][name] * scale
        layers[group][name][..., 0] = 0.0
    for group in ("attn", "mlp"):
        for name, value in layers[group].items():
            if name not in ("o_kernel", "down_kernel") and name.endswith("kernel"):
                layers[group][name] = value * scale
    # ~ the value of dimension 0 after the final RMS norm (the other dimensions have rms ~3).
    norm_scale = 30.0 / np.sqrt((30.0**2 + 9.0 * (dim - 1)) / dim)
    bias = np.zeros(vocab, np.float32)
    bias[list(special)] = -30.0
    words = np.array([i for i in range(vocab) if i not in special | spoken])
    bias[ids["</search>"]] = np.log(len(words) / 30.0)  # ~1 in 30 tokens closes a search
    for tag in ("<search>", "<answer>", "</answer>"):  # rare outside their forced places
        bias[ids[tag]] = -6.0
    head = rng.randn(dim, vocab).astype(np.float32) * 0.02
    head[0] = bias / norm_scale
    unit = emb[:, 1:] / np.linalg.norm(emb[:, 1:], axis=1, keepdims=True)

    def force(current, following, logit):
        head[1:, following] += logit / np.sqrt(dim) * unit[current] * 1.3

    newline = tokenizer.encode("\n", add_special_tokens=False)[0]
    answer_word = int(words[len(words) // 2])
    force(newline, ids["<search>"], 24.0)
    force(newline, ids["<answer>"], 22.9)  # ~30% answers
    force(ids["<answer>"], answer_word, 16.0)
    force(answer_word, ids["</answer>"], 28.0)
    params["lm_head"] = head
    return jax.tree.map(jnp.asarray, params)


# ---------------------------------------------------------------------------------------------
# (a) The reference loop: transformers generate per turn, re-tokenizing the whole context.
# ---------------------------------------------------------------------------------------------
def reference_loop(
    hf_model, tokenizer, retriever, prompts: list[str], cfg: SamplerConfig, seed: int
) -> dict:
    import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)
    from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    stops = [torch.tensor(s) for s in cfg.search_stops + cfg.answer_stops]  # built once

    class StopOnSequences(StoppingCriteria):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            generated = input_ids[:, self.start :]
            for seq in stops:
                n = len(seq)
                if generated.shape[1] >= n:
                    done |= (generated[:, -n:] == seq).all(dim=1)
            return done

    torch.manual_seed(seed)
    contexts = list(prompts)
    responses = [""] * len(prompts)
    active = list(range(len(prompts)))
    tokenizer.padding_side = "left"
    stop_pattern = re.compile(r"</search>|</answer>")
    turn_texts = []  # the generated text of every turn (counted after the timing)
    for turn in range(cfg.max_turns + 1):
        if not active:
            break
        batch = tokenizer(
            [contexts[i] for i in active],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        width = batch["input_ids"].shape[1]
        with torch.no_grad():
            out = hf_model.generate(
                **batch,
                max_new_tokens=cfg.max_new_tokens_per_turn,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=list(cfg.eos_token_ids) or None,
                stopping_criteria=StoppingCriteriaList([StopOnSequences(width)]),
            )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=False)
        searches, still = [], []
        for i, text in zip(active, texts):
            text = text.replace(tokenizer.pad_token, "").strip()
            match = stop_pattern.search(text)
            if match:
                text = text[: match.end()]
            kind, content = parse_action(text)
            turn_texts.append(text)
            contexts[i] += text
            responses[i] += text
            if kind == "answer":
                continue
            if turn == cfg.max_turns:
                continue
            if kind == "search":
                searches.append((i, content))
            else:
                contexts[i] += INVALID_ACTION_NOTICE
                responses[i] += INVALID_ACTION_NOTICE
            still.append(i)
        if searches:
            docs = retriever.search([q for _, q in searches])
            for (i, _), doc in zip(searches, docs):
                obs_ids = tokenizer.encode(information_observation(doc), add_special_tokens=False)[
                    : cfg.max_obs_length
                ]
                obs = tokenizer.decode(obs_ids, skip_special_tokens=False)
                contexts[i] += obs
                responses[i] += obs
        active = still
    return {"responses": responses, "turn_texts": turn_texts}


def count_reference_tokens(tokenizer, prompts: list[str], result: dict) -> dict:
    """Token counts of a `reference_loop` result (done outside its timing)."""

    def count(texts):
        return sum(len(tokenizer.encode(t, add_special_tokens=False)) for t in texts)

    return {
        "prompt_tokens": count(prompts),
        "response_tokens": count(result["responses"]),
        "generated_tokens": count(result["turn_texts"]),
    }


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, < 1 minute on CPU")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument(
        "--ingest-chunk",
        type=int,
        default=None,
        help="observation tokens per ingest step (default: max_obs_length, one step each)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--search-latency-ms",
        type=float,
        default=0.0,
        help="added to every retriever call (all systems): a remote server's round trip",
    )
    parser.add_argument(
        "--wave-fraction", type=float, default=None, help="ours: SamplerConfig.wave_fraction"
    )
    parser.add_argument(
        "--cache-len",
        type=int,
        default=1280,
        help="KV slots per row; the step cost grows with it (rows that do not fit "
        "finish context_full)",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="threads of the transformers reference (the fastest on 2 shared cores)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("retrieval_service").setLevel(logging.WARNING)
    batch = args.batch or (8 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    hidden = args.hidden or (64 if args.quick else 256)
    layers = args.layers or (2 if args.quick else 4)

    import torch  # noqa: PLC0415 (torch is optional: the test and retrieval extras)
    import transformers  # noqa: PLC0415 (transformers is slow to import; loaded on use)

    # One torch thread: on the 2 shared cores of our CI machine it is 2-10x faster than two
    # (measured 0.16 s vs 0.4-2.3 s for 50 tokens of generate at B=8); use the best setting.
    torch.set_num_threads(args.torch_threads)
    with tempfile.TemporaryDirectory() as tmp:
        log.info("building the synthetic world, tokenizer and BM25 index")
        world, tokenizer, retriever = build_world(tmp, 100 if args.quick else 600)
        if args.search_latency_ms > 0:
            retriever = SlowRetriever(retriever, args.search_latency_ms / 1000)
        model_config = get_preset(
            "tiny",
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
        )
        params = agent_like_params(model_config, tokenizer, args.seed)
        save_hf(model_config, params, os.path.join(tmp, "model"))
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.join(tmp, "model"), dtype=torch.float32
        ).eval()
        prompts = [row["prompt"][0]["content"] for row in world.test[:batch]]
        # Worst case: prompt 256 + 400 generated + 4 observations of 150 = 1256 <= 1280 (default).
        max_obs = 150
        cfg = SamplerConfig(
            **stop_sequences_for(tokenizer),
            cache_len=args.cache_len,
            max_prompt_length=256,
            max_new_tokens_per_turn=100,
            max_new_tokens=400,
            max_obs_length=max_obs,
            max_turns=4,
            temperature=1.0,
            ingest_chunk=args.ingest_chunk or max_obs,
        )
        if args.wave_fraction is not None:
            cfg = cfg.replace(wave_fraction=args.wave_fraction)
        sampler = Sampler(model_config, cfg, tokenizer, retriever)
        log.info(
            "compiling the sampler (B=%d, hidden=%d, layers=%d, vocab=%d)",
            batch,
            hidden,
            layers,
            model_config.vocab_size,
        )
        started = time.perf_counter()
        sampler.generate(params, prompts, seed=args.seed + 100)
        compile_s = time.perf_counter() - started
        seeds = iter(range(args.seed, args.seed + 1000))
        ours_s, ours = timed(lambda: sampler.generate(params, prompts, seed=next(seeds)), repeats)
        seeds_event = args.seed + repeats - 1  # ours' last rollout: the same trajectories
        ours_tokens = ours.stats["generated_tokens"] + ours.stats["ingested_tokens"]
        log.info(
            "ours: %.2f s, %d tokens (%d generated), searches/row %.2f, finish %s",
            ours_s,
            ours_tokens,
            ours.stats["generated_tokens"],
            ours.arrays.num_searches.mean(),
            {r: ours.finish_reasons.count(r) for r in set(ours.finish_reasons)},
        )

        # Per-event host calls: the same compiled program (the wave policy is traced).
        per_event = Sampler(model_config, cfg.replace(wave_fraction=0.0), tokenizer, retriever)
        event_s, event = timed(lambda: per_event.generate(params, prompts, seed=seeds_event), 1)
        seeds_event_tokens = event.stats["generated_tokens"] + event.stats["ingested_tokens"]
        log.info("per-event host calls: %.2f s, %d host calls", event_s, event.stats["host_calls"])

        log.info("(a) transformers turn-by-turn reference loop")
        tokenizer.padding_side = "left"
        with torch.no_grad():  # warm-up (torch's first call is slow), as ours had its compile run
            warm = tokenizer(
                prompts[:2], return_tensors="pt", padding=True, add_special_tokens=False
            )
            hf_model.generate(
                **warm,
                max_new_tokens=4,
                do_sample=True,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
            )
        ref_s, ref = timed(
            lambda: reference_loop(hf_model, tokenizer, retriever, prompts, cfg, next(seeds)),
            1 if args.quick else 2,
        )
        ref = count_reference_tokens(tokenizer, prompts, ref)
        ref_tokens = ref["prompt_tokens"] + ref["response_tokens"]
        log.info("reference: %.2f s, %d tokens", ref_s, ref_tokens)

        log.info("(b) plain decode, no search")
        plain_len = max(
            1,
            int(
                round(
                    ours.stats["generated_tokens"] / batch
                    + 0.5 * (ours_tokens - ours.stats["generated_tokens"]) / batch
                )
            ),
        )
        plain_cfg = cfg.replace(
            max_turns=0,
            max_new_tokens_per_turn=plain_len,
            max_new_tokens=plain_len,
            search_stops=((model_config.vocab_size,),),
            answer_stops=(),
            eos_token_ids=(),
        )
        plain = Sampler(model_config, plain_cfg, tokenizer, retriever)
        plain.generate(params, prompts, seed=1)
        plain_s, plain_out = timed(
            lambda: plain.generate(params, prompts, seed=next(seeds)), repeats
        )
        plain_tokens = plain_out.stats["generated_tokens"] + plain_out.stats["ingested_tokens"]

    ours_tps, ref_tps, plain_tps = ours_tokens / ours_s, ref_tokens / ref_s, plain_tokens / plain_s
    ours_gen = ours.stats["generated_tokens"]
    plain_gen = plain_out.stats["generated_tokens"]
    ref_gen = ref["generated_tokens"]
    print(f"{'system':<32}{'seconds':>9}{'tokens':>8}{'tokens/s':>10}{'generated':>10}{'gen/s':>8}")
    for name, sec, tok_count, gen in (
        ("ours (compiled, KV kept)", ours_s, ours_tokens, ours_gen),
        ("per-event host calls", event_s, seeds_event_tokens, event.stats["generated_tokens"]),
        ("(a) transformers turn-by-turn", ref_s, ref_tokens, ref_gen),
        ("(b) plain decode, no search", plain_s, plain_tokens, plain_gen),
    ):
        print(
            f"{name:<32}{sec:>9.2f}{tok_count:>8d}{tok_count / sec:>10.0f}{gen:>10d}"
            f"{gen / sec:>8.0f}"
        )
    same = bool(np.array_equal(event.arrays.tokens, ours.arrays.tokens))

    def schedule(out, seconds):
        st = out.stats
        return {
            "seconds": round(seconds, 3),
            "host_calls": st["host_calls"],
            "decode_steps": st["decode_steps"],
            "ingest_steps": st["ingest_steps"],
            "decode_rows": st["decode_rows"],
            "ingest_rows": st["ingest_rows"],
            "model_calls": st["model_calls"],
            "bytes_to_host": st["bytes_to_host"],
            "searches_per_call": round(st["searches_per_call"], 2),
            "host_seconds": round(st["host_seconds"], 3),
        }

    print(
        f"host calls: ours {ours.stats['host_calls']} vs per-event {event.stats['host_calls']} "
        f"(max_turns {cfg.max_turns}); bytes to host {ours.stats['bytes_to_host']} vs "
        f"{event.stats['bytes_to_host']}; same trajectories: {same}"
    )
    result = {
        "benchmark": "rollout",
        "quick": args.quick,
        "machine": machine(),
        "device": str(jax.devices()[0].platform),
        "decode_path": ours.stats["decode_path"],
        "wave_fraction": cfg.wave_fraction,
        "search_latency_ms": args.search_latency_ms,
        "max_turns": cfg.max_turns,
        "host_calls": ours.stats["host_calls"],
        "model_calls": ours.stats["model_calls"],
        "bytes_to_host": ours.stats["bytes_to_host"],
        "ours": schedule(ours, ours_s),
        "per_event": schedule(event, event_s),
        "per_event_same_trajectories": same,
        "speedup_vs_per_event": round(event_s / ours_s, 2),
        "batch": batch,
        "hidden": hidden,
        "layers": layers,
        "vocab": model_config.vocab_size,
        "ingest_chunk": cfg.ingest_chunk,
        "torch_threads": args.torch_threads,
        "compile_seconds": round(compile_s, 2),
        "ours_seconds": round(ours_s, 3),
        "ours_tokens": ours_tokens,
        "ours_generated_tokens": ours.stats["generated_tokens"],
        "ours_tokens_per_s": round(ours_tps, 1),
        "ours_steps": ours.stats["steps"],
        "ours_ingest_steps": ours.stats["ingest_steps"],
        "ours_searches_per_row": round(float(ours.arrays.num_searches.mean()), 2),
        "ours_finish_reasons": {
            r: ours.finish_reasons.count(r) for r in sorted(set(ours.finish_reasons))
        },
        "cache_len": args.cache_len,
        "reference_seconds": round(ref_s, 3),
        "reference_tokens": ref_tokens,
        "reference_tokens_per_s": round(ref_tps, 1),
        "reference_generated_tokens": ref_gen,
        "plain_decode_tokens_per_s": round(plain_tps, 1),
        "ours_generated_tokens_per_s": round(ours_gen / ours_s, 1),
        "reference_generated_tokens_per_s": round(ref_gen / ref_s, 1),
        "plain_decode_generated_tokens_per_s": round(plain_gen / plain_s, 1),
        "generated_speedup_vs_reference_loop": round((ours_gen / ours_s) / (ref_gen / ref_s), 2),
        "generated_fraction_of_plain_decode": round((ours_gen / ours_s) / (plain_gen / plain_s), 3),
        "speedup_vs_reference_loop": round(ours_tps / ref_tps, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
