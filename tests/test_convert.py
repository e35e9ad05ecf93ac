"""The conversion CLI in both directions, with its self-check against transformers."""

import re

import numpy as np
import pytest
import torch
import transformers

import dgpo_jax
from dgpo_jax.checkpoint import convert
from dgpo_jax.checkpoint import params as ckpt_params
from dgpo_jax.checkpoint.checkpointer import Checkpointer


def _figures(out: str):
    found = re.findall(r"max abs logit diff ([0-9.e+-]+), mean per-token KL ([0-9.e+-]+) \(OK", out)
    assert found, out
    return [(float(a), float(b)) for a, b in found]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_to_ckpt_to_hf(hf_models, tmp_path, capsys, dtype):
    path, hf = hf_models[(False, 1e6)]
    assert (
        convert.main(["hf-to-ckpt", "--hf", path, "--out", str(tmp_path / "ck"), "--dtype", dtype])
        == 0
    )
    assert (
        convert.main(["ckpt-to-hf", "--ckpt", str(tmp_path / "ck"), "--out", str(tmp_path / "hf")])
        == 0
    )
    (d1, kl1), (d2, kl2) = _figures(capsys.readouterr().out)
    bound = 1e-4 if dtype == "float32" else 1.5e-2
    assert kl1 <= bound and kl2 <= bound
    # The exported directory is what transformers loads; in float32 it is the source exactly.
    if dtype == "float32":
        ids = torch.tensor(np.random.RandomState(1).randint(0, 256, (2, 7)))
        re_hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
        with torch.no_grad():
            np.testing.assert_array_equal(re_hf(ids).logits.numpy(), hf(ids).logits.numpy())


def test_checkpoint_holds_config_and_params(hf_models, tmp_path):
    path, _ = hf_models[(True, 1e4)]
    config, params = dgpo_jax.load_hf(path, dtype="float32")
    ckpt_params.save_params_checkpoint(config, params, str(tmp_path / "ck"), step=7)
    c2, p2, meta = ckpt_params.load_params_checkpoint(str(tmp_path / "ck"))
    assert c2 == config and meta["kind"] == "params"
    np.testing.assert_array_equal(
        np.asarray(p2["layers"]["attn"]["q_kernel"]),
        np.asarray(params["layers"]["attn"]["q_kernel"]),
    )


def test_checkpoint_without_model_config_is_refused(tmp_path):
    with Checkpointer(str(tmp_path / "ck")) as ck:
        ck.save(0, {"params": {"w": np.ones(3, np.float32)}}, {"note": "not a model"}, force=True)
    with pytest.raises(KeyError, match="no 'model_config'"):
        ckpt_params.load_params_checkpoint(str(tmp_path / "ck"))


def test_demo(tmp_path, capsys):
    assert convert.main(["demo", "--workdir", str(tmp_path)]) == 0
    assert len(_figures(capsys.readouterr().out)) == 2
