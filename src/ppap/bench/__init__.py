"""The benches behind ``ppap bench``: ``classifier`` (the paper's comparison on the zoo),
``dense`` (layout guidance with the zoo's dense models), ``rgb`` (the colour text-conditional
models with classifier-free guidance, ``ppap.bench.rgb``) and ``scale`` (cost and memory of
published architectures at their real sizes, ``ppap.bench.scale``), on one shared stage / worker
/ report layer (``common``). Every stage is saved under the results folder, so a re-run resumes."""

from .classifier import run_classifier_bench
from .classifier_report import classifier_report
from .classifier_tables import QUICK, BenchConfig
from .dense import QUICK as DENSE_QUICK
from .dense import DenseBenchConfig, dense_report, run_dense_bench

__all__ = [
    "BenchConfig",
    "DENSE_QUICK",
    "DenseBenchConfig",
    "QUICK",
    "classifier_report",
    "dense_report",
    "run_classifier_bench",
    "run_dense_bench",
]
