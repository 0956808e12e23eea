"""diffusers' custom-pipeline entry point of a ppap pipeline folder: the class is the installed
ppap package's own (pip install ppap). Load with
DiffusionPipeline.from_pretrained(folder, custom_pipeline="ppap_pipeline", trust_remote_code=True)."""

from ppap.pipeline import PPAPPipeline

__all__ = ["PPAPPipeline"]
