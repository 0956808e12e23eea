"""The command line answers --help and argument errors without importing torch (or numpy,
diffusers, transformers, peft, or a command's implementation): a newcomer's first commands
return at once."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "diffusers", "transformers", "peft", "accelerate", "ppap.commands")  # the commands load after parsing

PROBE = """
import sys
from ppap.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:
    status = e.code
print("HEAVY", *[m for m in {heavy!r} if m in sys.modules], file=sys.stderr)
sys.exit(status)
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True, timeout=60)


def _subcommands() -> list[str]:
    from ppap.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("args", [["--help"]] + [[name, "--help"] for name in _subcommands()])
def test_help_imports_no_torch(args):
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    assert "usage: ppap" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "HEAVY", proc.stderr


@pytest.mark.parametrize(
    "args",
    [["sample", "--bogus-flag"], ["sample"], ["train", "--diffusion", "x"], ["generate", "--num", "many"], ["--threads", "0", "demo"]],
)
def test_argument_errors_import_no_torch(args):
    proc = _run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "HEAVY" and lines[-2].startswith("ppap"), proc.stderr


def test_import_ppap_is_lazy_and_names_still_resolve():
    code = "import sys, ppap; print('torch' in sys.modules); from ppap import PPAPPipeline, TrainConfig, PPAPError; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert out == ["False", "True"]
    import ppap

    assert set(ppap.__all__) <= set(dir(ppap))
    with pytest.raises(AttributeError):
        ppap.no_such_name  # noqa: B018
