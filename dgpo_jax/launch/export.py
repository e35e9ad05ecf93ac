"""``mode=export``: a run's checkpoint (``export.step``; the latest by default) to a Hugging
Face directory with the tokenizer."""

from __future__ import annotations

import logging
import os

from dgpo_jax.checkpoint.checkpointer import Checkpointer
from dgpo_jax.checkpoint.params import policy_params
from dgpo_jax.models import Qwen2Config, save_hf
from dgpo_jax.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def run_export(cfg) -> str:
    ck = Checkpointer(os.path.join(cfg.workdir, "checkpoints"))
    step = ck.latest_step() if cfg.export.step < 0 else cfg.export.step
    meta = ck.restore_metadata(step)
    state, _ = ck.restore(step)
    ck.close()
    config = Qwen2Config.from_hf_dict(meta["model_config"], source=f"{ck.directory} metadata")
    params = policy_params(state, ck.directory)
    out = cfg.export.out or os.path.join(cfg.workdir, f"export_{step}")
    save_hf(
        config,
        params,
        out,
        tokenizer=load_tokenizer(cfg.model.tokenizer),
        dtype=cfg.export.dtype or None,
        overwrite=True,
    )
    log.info("exported step %d to %s", step, out)
    return out
