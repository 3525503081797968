"""One module per training method; each exposes ``train(cfg) -> Path`` (the final/ directory)."""

from . import sft

METHODS = {"sft": sft.train}
