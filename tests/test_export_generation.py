"""Exports that stop generating: ``save_hf`` writes bos/eos/pad ids into ``config.json`` and a
``generation_config.json`` (the source model's, or the tokenizer's eos list and pad id), and
they survive HF -> ``load_hf`` -> ``save_hf`` and HF -> checkpoint -> HF."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import dgpo_jax
from dgpo_jax.checkpoint import convert
from dgpo_jax.models.hf_io import generation_settings
from tests.conftest import random_params

# A chat-style word tokenizer: <|im_end|> ends a turn (eos), <|endoftext|> pads, as in Qwen2.5.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD, EOS = 0, 2
VOCAB = 32
# The crafted model's greedy successor of each token: 10 -> 11 -> 12 -> 13 -> eos -> 10 -> ...
# (a loop, so a model that does not stop at eos runs on to max_new_tokens).
CHAIN = {10: 11, 11: 12, 12: 13, 13: EOS, EOS: 10}


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers  # noqa: PLC0415

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def _chain_model():
    """A tiny untied model whose greedy next token is CHAIN[token]: one-hot embeddings, attention
    and MLP outputs zeroed (the residual stream is the token's embedding), a successor lm head."""
    config = dgpo_jax.get_preset(
        "tiny",
        vocab_size=VOCAB,
        hidden_size=VOCAB,
        intermediate_size=32,
        num_hidden_layers=1,
        tie_word_embeddings=False,
    )
    params = random_params(config, seed=0)
    head = np.zeros((VOCAB, VOCAB), np.float32)
    for a, b in CHAIN.items():
        head[a, b] = 1.0
    params["embed_tokens"] = jnp.eye(VOCAB, dtype=jnp.float32)
    params["lm_head"] = jnp.asarray(head)
    params["layers"]["attn"]["o_kernel"] = jnp.zeros_like(params["layers"]["attn"]["o_kernel"])
    params["layers"]["mlp"]["down_kernel"] = jnp.zeros_like(params["layers"]["mlp"]["down_kernel"])
    return config, params


def _read(path, name):
    with open(f"{path}/{name}") as f:
        return json.load(f)


@pytest.mark.parametrize("as_dir", [False, True])
def test_tokenizer_export_stops_at_eos_in_transformers(tmp_path, as_dir):
    config, params = _chain_model()
    assert config.eos_token_id is None and config.generation_config is None  # a preset
    tok = _tokenizer()
    if as_dir:
        tok.save_pretrained(str(tmp_path / "tok"))
        tok = str(tmp_path / "tok")
    out = dgpo_jax.save_hf(config, params, str(tmp_path / "export"), tokenizer=tok)
    cfg = _read(out, "config.json")
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (None, EOS, PAD)
    assert "dgpo_generation_config" not in cfg
    # Both of Qwen's ends: the tokenizer's eos, then <|endoftext|>.
    assert _read(out, "generation_config.json") == {"eos_token_id": [EOS, PAD], "pad_token_id": PAD}

    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.generation_config.eos_token_id == [EOS, PAD]
    max_new = 12
    with torch.no_grad():
        ids = model.generate(
            input_ids=torch.tensor([[5, 10]]),
            attention_mask=torch.ones(1, 2, dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
        )
    new = ids[0, 2:].tolist()
    assert new == [11, 12, 13, EOS]  # stopped at eos, well before max_new_tokens
    assert len(new) < max_new


def test_qwen_tokenizer_rule_and_config_ids():
    class QwenLike:  # the ids of the Qwen2.5 chat tokenizer, without building it
        bos_token_id, eos_token_id, pad_token_id = None, 151645, 151643

        def get_vocab(self):
            return {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

    ids, gen = generation_settings(dgpo_jax.get_preset("tiny", vocab_size=151936), QwenLike())
    assert ids == {"bos_token_id": None, "eos_token_id": 151645, "pad_token_id": 151643}
    assert gen == {"eos_token_id": [151645, 151643], "pad_token_id": 151643}
    # A config's own ids win in config.json; its eos joins the tokenizer's list.
    ids, gen = generation_settings(dgpo_jax.get_preset("qwen2.5-0.5b"), QwenLike())
    assert ids == {"bos_token_id": 151643, "eos_token_id": 151643, "pad_token_id": 151643}
    assert gen["eos_token_id"] == [151645, 151643]
    # Nothing known: nothing invented.
    assert generation_settings(dgpo_jax.get_preset("tiny")) == (
        {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None},
        {},
    )


SOURCE_GEN = {
    "bos_token_id": 60,
    "eos_token_id": [62, 60],
    "pad_token_id": 60,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
}


def _without_version(d):
    return {k: v for k, v in d.items() if k != "transformers_version"}


def test_hf_generation_config_round_trips(tmp_path):
    """An HF directory with Qwen2.5-Instruct-like ids and sampling defaults, written by
    transformers -> load_hf -> save_hf, and -> checkpoint -> HF (with a tokenizer that loses)."""
    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=60,
        eos_token_id=62,
        pad_token_id=60,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.generation_config = transformers.GenerationConfig(**SOURCE_GEN)
    src = tmp_path / "src"
    model.save_pretrained(str(src))
    source_gen = _without_version(_read(src, "generation_config.json"))
    assert source_gen == SOURCE_GEN  # what transformers wrote

    config, params = dgpo_jax.load_hf(str(src), dtype="float32")
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (60, 62, 60)
    assert config.generation_config == SOURCE_GEN
    out = dgpo_jax.save_hf(config, params, str(tmp_path / "out"))
    assert _without_version(_read(out, "generation_config.json")) == source_gen
    got = _read(out, "config.json")
    assert (got["bos_token_id"], got["eos_token_id"], got["pad_token_id"]) == (60, 62, 60)
    loaded = transformers.GenerationConfig.from_pretrained(out)
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.top_k) == ([62, 60], 60, 20)

    # HF -> orbax checkpoint (ids and generation config in its metadata) -> HF.
    _tokenizer().save_pretrained(str(tmp_path / "tok"))
    assert convert.hf_to_ckpt(str(src), str(tmp_path / "ck"), dtype="float32")
    assert convert.ckpt_to_hf(
        str(tmp_path / "ck"), str(tmp_path / "hf"), tokenizer=str(tmp_path / "tok")
    )
    assert _without_version(_read(tmp_path / "hf", "generation_config.json")) == source_gen
    got = _read(tmp_path / "hf", "config.json")
    assert (got["bos_token_id"], got["eos_token_id"], got["pad_token_id"]) == (60, 62, 60)
