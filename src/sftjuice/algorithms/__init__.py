"""One module per training method; each exposes ``train(cfg) -> Path`` (the final/ directory)."""

from . import irft, rft, sft

METHODS = {"sft": sft.train, "irft": irft.train, "spin": irft.train_spin, "rft": rft.train}
