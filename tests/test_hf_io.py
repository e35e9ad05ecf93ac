"""Hugging Face directories in and out, and clear errors on bad input."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import dgpo_jax
from dgpo_jax.errors import ModelFormatError
from tests.conftest import make_hf_model


def _ids():
    return np.random.RandomState(5).randint(0, 256, (2, 9))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_export_reload_in_transformers(hf_models, tmp_path, tied):
    path, hf = hf_models[(tied, 1e6)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    out = dgpo_jax.save_hf(config, params, str(tmp_path / "export"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    np.testing.assert_allclose(_logits(reloaded, ids), _logits(hf, ids), atol=1e-5, rtol=0)
    ours = np.asarray(dgpo_jax.forward(config, params, ids))
    assert np.abs(ours - _logits(reloaded, ids)).max() <= 1e-4
    assert ("lm_head.weight" in load_file(f"{out}/model.safetensors")) == (not tied)


def test_sharded_safetensors_both_ways(tmp_path):
    hf = make_hf_model(tmp_path / "src", max_shard_size="60KB")
    assert os.path.exists(tmp_path / "src" / "model.safetensors.index.json")
    config, params = dgpo_jax.load_hf(str(tmp_path / "src"), dtype="float32")
    out = dgpo_jax.save_hf(config, params, str(tmp_path / "dst"), max_shard_bytes=50_000)
    with open(f"{out}/model.safetensors.index.json") as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    np.testing.assert_allclose(_logits(reloaded, ids), _logits(hf, ids), atol=1e-5, rtol=0)


def test_bfloat16_export(hf_models, tmp_path):
    path, hf = hf_models[(True, 1e6)]
    config, params = dgpo_jax.load_hf(path, dtype="bfloat16")
    out = dgpo_jax.save_hf(config, params, str(tmp_path / "bf16"))
    with open(f"{out}/config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    src = load_file(f"{path}/model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    got = reloaded.model.layers[0].mlp.up_proj.weight.float().detach().numpy()
    np.testing.assert_array_equal(got, src.astype(np.float32).astype("bfloat16").astype(np.float32))


def test_save_refuses_to_overwrite_and_leaves_no_partial_dir(hf_models, tmp_path):
    path, _ = hf_models[(False, 1e4)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    dst = tmp_path / "m"
    dgpo_jax.save_hf(config, params, str(dst))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        dgpo_jax.save_hf(config, params, str(dst))
    bad = dict(params, embed_tokens=params["embed_tokens"][:10])
    with pytest.raises(ValueError, match="embed_tokens has shape"):
        dgpo_jax.save_hf(config, bad, str(tmp_path / "n"))
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary leftovers


# ---------------------------------------------------------------------------- bad input ----
def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_error_no_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        dgpo_jax.load_hf(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        dgpo_jax.load_hf(str(tmp_path / "nope"))


def test_error_wrong_architecture(hf_models, tmp_path):
    d = _copy(hf_models[(False, 1e4)][0], tmp_path / "llama")
    with open(f"{d}/config.json") as f:
        cfg = json.load(f)
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    with open(f"{d}/config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture.*llama"):
        dgpo_jax.load_hf(d)


def _rewrite(d, fn):
    tensors = load_file(f"{d}/model.safetensors")
    fn(tensors)
    save_file(tensors, f"{d}/model.safetensors", metadata={"format": "pt"})


def test_error_missing_tensor(hf_models, tmp_path):
    d = _copy(hf_models[(False, 1e4)][0], tmp_path / "missing")
    _rewrite(d, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(
        ModelFormatError, match=r"missing tensors \['model.layers.1.self_attn.k_proj.bias'"
    ):
        dgpo_jax.load_hf(d)


def test_error_misshaped_tensor(hf_models, tmp_path):
    d = _copy(hf_models[(False, 1e4)][0], tmp_path / "shape")

    def cut(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :50]

    _rewrite(d, cut)
    with pytest.raises(
        ValueError,
        match=r"model.layers.0.mlp.down_proj.weight has shape " r"\(64, 50\), expected \(64, 96\)",
    ):
        dgpo_jax.load_hf(d)


def test_error_unsupported_dtypes(hf_models, tmp_path):
    path = hf_models[(False, 1e4)][0]
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        dgpo_jax.load_hf(path, dtype="int8")
    d = _copy(path, tmp_path / "f64")

    def widen(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.float64)

    _rewrite(d, widen)
    with pytest.raises(ValueError, match="model.norm.weight has unsupported dtype F64"):
        dgpo_jax.load_hf(d)


def test_error_pickle_only_checkpoint(hf_models, tmp_path):
    d = _copy(hf_models[(False, 1e4)][0], tmp_path / "bin")
    os.remove(f"{d}/model.safetensors")
    open(f"{d}/pytorch_model.bin", "wb").close()
    with pytest.raises(FileNotFoundError, match="not read: they are pickles"):
        dgpo_jax.load_hf(d)
