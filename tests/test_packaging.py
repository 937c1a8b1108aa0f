"""The wheel installs into a fresh venv and works from another directory; kernels/ ships as
timellm_fast.kernels, never as a top-level `kernels` package."""
import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import REPO



@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-q", "-w", str(out)]
    # with this environment's setuptools first (the GPU machine has no package index); an old
    # setuptools without `wheel` (a fresh Python 3.11 venv) fails at once, then pip builds in
    # an isolated environment from the index
    if subprocess.run(cmd + ["--no-build-isolation", "--no-index"], capture_output=True, timeout=600).returncode:
        subprocess.run(cmd, check=True, timeout=600)
    (whl,) = out.glob("timellm_fast-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for op in ("patch_embedding", "reprogramming_attention"):  # each op's kernels and its tile tables
        assert f"timellm_fast/kernels/{op}.py" in names
        assert f"timellm_fast/kernels/{op}_tiles.py" in names
    assert "timellm_fast/reference.py" in names
    assert not any(n.startswith("kernels/") for n in names), "a top-level kernels package shipped"
    entry_points = [n for n in names if n.endswith("entry_points.txt")]
    assert entry_points and "timellm-fast" in zipfile.ZipFile(wheel).read(entry_points[0]).decode()


def test_wheel_installs_in_fresh_venv_and_runs_an_op(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # torch and triton come from this environment (a .pth line adds the directory only: the
    # editable-install hooks of this checkout are not loaded), timellm_fast from the wheel.
    venv_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    Path(venv_site, "deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300)
    script = (
        "import os, torch, timellm_fast, importlib.util\n"
        "assert timellm_fast.__file__.startswith(os.environ['VENV']), timellm_fast.__file__\n"
        "assert importlib.util.find_spec('kernels') is None, 'top-level kernels importable'\n"
        "from timellm_fast.kernels import patch_embedding as k\n"
        "layer = timellm_fast.PatchEmbedding(16, 16, 8, 0.0).eval()\n"
        "y, n = layer(torch.randn(2, 3, 64))\n"
        "assert y.shape == (6, 8, 16) and n == 3\n"
        "print('ok', timellm_fast.dispatch.last_path)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["VENV"] = str(venv)
    proc = subprocess.run([str(py), "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok")
    cli = subprocess.run([str(venv / "bin" / "timellm-fast"), "--help"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "check" in cli.stdout
