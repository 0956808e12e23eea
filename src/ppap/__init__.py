"""ppap: practical plug-and-play guidance of diffusion models (Go et al., CVPR 2023).

Guide a pretrained diffusion model with an off-the-shelf model trained only on clean images,
through N noise-range LoRA experts trained data-free on the model's own samples.
"""

from .diffusion import Conditioning, Diffusion, NoiseSchedule, Prediction
from .experts import AdapterConfig, ExpertBank, FullExperts, LoRAExperts, TimestepRouter, load_bank, save_bank
from .guidance import GuidanceTerm, GuideSpec, NoisyInputGuide, PredictedX0Guide, SumGuide, build_guide
from .guide_model import GuideModel
from .io import PPAPError
from .pipeline import PPAPPipeline
from .samplers import sample_ddim, sample_ddpm
from .schedulers import sample_scheduler
from .tasks import Classification, DenseRegression, Segmentation
from .train import TrainConfig, train_experts

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
    "GuideSpec",
    "LoRAExperts",
    "NoiseSchedule",
    "NoisyInputGuide",
    "PPAPError",
    "PPAPPipeline",
    "PredictedX0Guide",
    "Prediction",
    "Segmentation",
    "SumGuide",
    "TimestepRouter",
    "TrainConfig",
    "build_guide",
    "load_bank",
    "sample_ddim",
    "sample_ddpm",
    "sample_scheduler",
    "save_bank",
    "train_experts",
]
