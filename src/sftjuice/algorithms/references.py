"""The reference policies, in one place.

pi_SFT is the policy as training starts, frozen: pi_ref of RFT's and SRPPO's KL penalty,
SRPPO's reward, DPO's reference in RSO and steps, the sampler of RSO's candidates and of
steps' rollouts. What it is depends on how the policy trains:

- full weights: a frozen copy of the starting policy, made before the first step;
- ``--lora`` from a full model: the policy with its adapter switched off (the base is the
  starting model, so no copy is kept);
- ``--lora`` from a LoRA adapter directory (an SFT run's ``final/`` with ``--lora``): the
  policy with its trainable adapter switched to the frozen copy of that adapter that
  :func:`models.load_policy` loads beside it (TRL's ``ref_adapter_name``). Switching the
  adapter off would give the adapter's base model, not pi_SFT.

IRFT's pi_t, the policy frozen at the start of round t, is the policy itself, read before
the round's first step (:func:`round_start`): at round 0 it is pi_SFT in every case.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, ContextManager

from ..models import REFERENCE_ADAPTER, is_peft
from ..training import Run


def starting_policy(run: Run) -> Callable[[], ContextManager]:
    """pi_SFT: ``with pi_sft() as model:`` scores or samples with it. Call before the first
    step (and before a resume loads a checkpoint): a full-weight policy is copied then."""
    if not is_peft(run.policy):
        frozen = copy.deepcopy(run.policy).eval().requires_grad_(False)
        return lambda: contextlib.nullcontext(frozen)
    trainable = run.policy.active_adapter

    @contextlib.contextmanager
    def pi_sft():
        policy = run.policy
        if REFERENCE_ADAPTER not in policy.peft_config:
            with policy.disable_adapter():
                yield policy
            return
        policy.set_adapter(REFERENCE_ADAPTER, inference_mode=True)  # frozen while it is active, too
        try:
            yield policy
        finally:
            policy.set_adapter(trainable)

    return pi_sft


def round_start(run: Run):
    """IRFT's pi_t: the policy as it stands, which is pi_t until the round's first step."""
    return run.policy
