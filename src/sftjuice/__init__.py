"""sftjuice: get more out of SFT data by learning a reward from the demonstrations.

    from sftjuice import IRFTConfig, train
    train(IRFTConfig(model="HF-model-dir", data="demos.jsonl", output="runs/irft"))
"""

from .api import train
from .config import IRFTConfig, RestConfig, RFTConfig, RSOConfig, SFTConfig, SPINConfig, SftjuiceError, SRPPOConfig, StepsConfig

__all__ = ["train", "SFTConfig", "IRFTConfig", "SPINConfig", "RFTConfig", "StepsConfig", "RestConfig", "SRPPOConfig",
           "RSOConfig", "SftjuiceError"]
