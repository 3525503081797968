"""One module per training method; each exposes ``train(cfg, model, tokenizer, data) -> Path``
(the final/ directory). SPIN is IRFT's loop with :class:`config.SPINConfig`."""

from . import irft, rft, rso, sft, srppo, steps

METHODS = {"sft": sft.train, "irft": irft.train, "spin": irft.train, "rft": rft.train,
           "steps": steps.train, "rest": steps.train_rest, "srppo": srppo.train,
           "rso": rso.train}
