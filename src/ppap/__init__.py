"""ppap: practical plug-and-play guidance of diffusion models (Go et al., CVPR 2023).

Guide a pretrained diffusion model with an off-the-shelf model trained only on clean images,
through N noise-range LoRA experts trained data-free on the model's own samples.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .bank_format import save_bank
    from .banks import AdapterConfig, ExpertBank, FullExperts, LoRAExperts, load_bank
    from .config import TrainConfig
    from .diffusion import Conditioning, Diffusion, NoiseSchedule, Prediction
    from .errors import PPAPError
    from .guidance import GuidanceSpec, GuidanceTerm, NoisyInputGuidance, PredictedX0Guidance, SumGuidance, build_guidance
    from .guide_model import GuideModel
    from .pipeline import PPAPPipeline
    from .router import TimestepRouter
    from .samplers import sample_ddim, sample_ddpm
    from .schedulers import sample_scheduler
    from .tasks import Classification, DenseRegression, Segmentation
    from .train import train_experts

# The public API is loaded on first use (PEP 562): `import ppap` and the command line stay fast,
# and a name's module (torch, diffusers, peft) is imported only when the name is.
_LAZY = {
    "AdapterConfig": "banks",
    "build_guidance": "guidance",
    "Classification": "tasks",
    "Conditioning": "diffusion",
    "DenseRegression": "tasks",
    "Diffusion": "diffusion",
    "ExpertBank": "banks",
    "FullExperts": "banks",
    "GuidanceTerm": "guidance",
    "GuideModel": "guide_model",
    "GuidanceSpec": "guidance",
    "load_bank": "banks",
    "LoRAExperts": "banks",
    "NoiseSchedule": "diffusion",
    "NoisyInputGuidance": "guidance",
    "PPAPError": "errors",
    "PPAPPipeline": "pipeline",
    "PredictedX0Guidance": "guidance",
    "Prediction": "diffusion",
    "sample_ddim": "samplers",
    "sample_ddpm": "samplers",
    "sample_scheduler": "schedulers",
    "save_bank": "bank_format",
    "Segmentation": "tasks",
    "SumGuidance": "guidance",
    "TimestepRouter": "router",
    "train_experts": "train",
    "TrainConfig": "config",
}

__version__ = "0.2.0"
__all__ = [
    "AdapterConfig",
    "Classification",
    "Conditioning",
    "DenseRegression",
    "Diffusion",
    "ExpertBank",
    "FullExperts",
    "GuidanceTerm",
    "GuideModel",
    "GuidanceSpec",
    "LoRAExperts",
    "NoiseSchedule",
    "NoisyInputGuidance",
    "PPAPError",
    "PPAPPipeline",
    "PredictedX0Guidance",
    "Prediction",
    "Segmentation",
    "SumGuidance",
    "TimestepRouter",
    "TrainConfig",
    "build_guidance",
    "load_bank",
    "sample_ddim",
    "sample_ddpm",
    "sample_scheduler",
    "save_bank",
    "train_experts",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ppap' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
