"""The Python API: one ``train`` for every method, the way the command line calls it.

    from sftjuice import IRFTConfig, train
    final = train(IRFTConfig(model="my-sft-model", data="demos.jsonl", output="runs/irft"))

``model`` may also be an already loaded causal LM (with ``tokenizer``), and ``data`` a
``datasets.Dataset`` or a list of rows; the config's ``model``/``data`` are then ignored.
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig


def train(cfg: TrainConfig, model=None, tokenizer=None, data=None) -> Path:
    """Train with ``cfg``'s method (``cfg`` is an ``SFTConfig``, ``IRFTConfig``, ...); returns
    the ``final/`` directory, which ``AutoModelForCausalLM.from_pretrained`` loads."""
    from .algorithms import METHODS
    from .stopping import release

    try:
        return METHODS[cfg.method](cfg, model=model, tokenizer=tokenizer, data=data)
    finally:  # ended, failed or stopped: the caller gets its signal handlers back, and the folder is free
        release(cfg.output)
