"""The package's metadata has one source: the version is written once, in ppap.__version__."""

import subprocess
import sys

import ppap

from conftest import REPO


def test_the_built_version_is_ppap_version_and_reading_it_imports_nothing():
    code = (
        "import sys; from setuptools.config.pyprojecttoml import read_configuration; "
        f"print(read_configuration({str(REPO / 'pyproject.toml')!r})['project']['version']); "
        "print('torch' in sys.modules, 'ppap' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout.split()
    assert out == [ppap.__version__, "False", "False"]  # setuptools reads the assignment statically
