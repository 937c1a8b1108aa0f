"""The wheel installs into a fresh venv and works from another directory; kernels/ ships as
timellm_fast.kernels, never as a top-level `kernels` package."""
import importlib.metadata
import os
import shutil
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
    # built from a copy of the sources: setuptools writes build/ and *.egg-info into the tree it
    # builds, and pytest-xdist may run this fixture in two workers at once
    src = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("timellm_fast", "kernels"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)]
    # with this environment's setuptools first (the GPU machine has no package index); an old
    # setuptools without `wheel` (a fresh Python 3.11 venv) fails at once, then pip builds in
    # an isolated environment from the index
    if subprocess.run(cmd + ["--no-build-isolation", "--no-index"], capture_output=True, timeout=600).returncode:
        subprocess.run(cmd, check=True, timeout=600)
    (whl,) = out.glob("timellm_fast-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for op in ("patch_embedding", "attention"):  # each op's kernels and its tile tables
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
        # a top-level kernels, if any, is another package's (Hugging Face's, among the dependencies)
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or not spec.origin.startswith(os.environ['VENV']), 'the wheel ships a top-level kernels'\n"
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


def test_the_checkout_never_shadows_a_top_level_kernels_package():
    """Run from the checkout's root, `import kernels` must give Hugging Face's `kernels` package
    where it is installed (transformers imports it whenever it is), not our kernels/; where it is
    not, our directory stays an empty package without a version, which transformers' probe
    imports and takes for no usable `kernels`."""
    try:
        importlib.metadata.distribution("kernels")
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = False
    probe = "import kernels, os\nprint(os.path.abspath(kernels.__file__), getattr(kernels, '__version__', None))\n"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    path, version = proc.stdout.split()
    ours = Path(path) == REPO / "kernels" / "__init__.py"
    if installed:
        assert not ours and version != "None", proc.stdout
    else:
        assert ours and version == "None", proc.stdout
