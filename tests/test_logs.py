"""TensorFlow's start-up notices stay off the terminal (app.quiet_logs), and real errors still show."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.ml.classes import CLASS_NAMES
from app.quiet_logs import LEVEL_VARIABLE, LOAD_NOTICES, filtered_stderr

REPO_ROOT = Path(__file__).resolve().parents[1]
PAPCAD = Path(sys.executable).with_name("papcad")  # the console script `pip install -e .` wrote
# What TensorFlow 2.21 writes while it loads on x86-64 at level 0 (the last two: the cpu_feature_guard notice).
NOTICES = (*LOAD_NOTICES, "cpu_feature_guard", "rebuild TensorFlow")


def run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """`command` with the user's environment, less any TensorFlow log level of theirs (or the tests')."""
    environment = {k: v for k, v in os.environ.items() if k != LEVEL_VARIABLE} | {"COLUMNS": "200"} | env
    return subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)


@pytest.mark.cli
@pytest.mark.slow
def test_papcad_predict_shows_results_and_errors_without_tensorflow_notices(
    tiny_model_dir: Path, herlev_one_per_class: dict[str, Path], tmp_path: Path
) -> None:
    image, missing = next(iter(herlev_one_per_class.values())), tmp_path / "missing.png"
    result = run([str(PAPCAD), "predict", "--model", str(tiny_model_dir), str(image), str(missing)])
    assert result.returncode == 1, result.stderr
    classified, failed = (json.loads(line) for line in result.stdout.splitlines())
    assert classified["predicted_class"] in CLASS_NAMES  # TensorFlow was loaded and ran
    assert failed["error"] == "no such file" and f"error: {missing}: no such file" in result.stderr
    assert not [notice for notice in NOTICES if notice in result.stderr], result.stderr


@pytest.mark.cli
@pytest.mark.slow  # a second TensorFlow start-up, for the opt-out
def test_level_zero_shows_tensorflow_notices_again() -> None:
    """The user's own TF_CPP_MIN_LOG_LEVEL wins: 0 shows everything (and proves the notices exist here)."""
    result = run([sys.executable, "-c", "import app, tensorflow"], **{LEVEL_VARIABLE: "0"})
    assert result.returncode == 0, result.stderr
    assert [notice for notice in LOAD_NOTICES if notice in result.stderr], result.stderr


def test_filter_drops_only_the_load_notices(capfd: pytest.CaptureFixture[str]) -> None:
    real = "E0000 00:00:1.0 1 op_kernel.cc:1] something failed\n"
    with filtered_stderr():
        os.write(2, f"WARNING: {LOAD_NOTICES[0]} is called are written to STDERR\n".encode())
        os.write(2, f"I0000 00:00:1.0 1 port.cc:153] {LOAD_NOTICES[1]}. You may see ...\n".encode())
        os.write(2, real.encode())
    assert capfd.readouterr().err == real


def test_a_message_written_just_before_a_crash_still_shows() -> None:
    code = "import os\nfrom app.quiet_logs import filtered_stderr\nwith filtered_stderr():\n"
    code += "    os.write(2, b'F0000 cpu_check.cc:1] this CPU lacks AVX\\n')\n    os.abort()\n"
    result = run([sys.executable, "-c", code])
    assert result.returncode == -6
    assert "this CPU lacks AVX" in result.stderr
