"""ppap: practical plug-and-play guidance of diffusion models (Go et al., CVPR 2023).

Guide a pretrained unconditional diffusion model with an off-the-shelf model trained only on
clean images, through N noise-range LoRA experts trained data-free on the model's own samples.
"""

from .diffusion import Diffusion, NoiseSchedule, Prediction
from .experts import AdapterConfig, FullExperts, LoRAExperts, TimestepRouter
from .guidance import GuideSpec, NoisyInputGuide, PredictedX0Guide, SumGuide, build_guide
from .io import PPAPError
from .samplers import sample_ddim, sample_ddpm
from .tasks import Classification
from .train import TrainConfig, load_experts, train_experts

__version__ = "0.1.0"
__all__ = [
    "AdapterConfig", "Classification", "Diffusion", "FullExperts", "GuideSpec", "LoRAExperts", "NoiseSchedule",
    "NoisyInputGuide", "PPAPError", "PredictedX0Guide", "Prediction", "SumGuide", "TimestepRouter", "TrainConfig",
    "build_guide", "load_experts", "sample_ddim", "sample_ddpm", "train_experts",
]
