"""Triton kernels and their launchers (installed as timellm_fast.kernels): per fused op, an entry
module the op layer calls (attention.py, patch_embedding.py) over files split by job (forward,
backward, shared device helpers, tiles); docs/design.md has the file map."""
import os as _os
import sys as _sys

if __name__ == "kernels":
    # This directory is a top-level `kernels` only where a checkout's root is on sys.path (`python
    # -m ...` run from it). That name belongs to Hugging Face's `kernels` package, which
    # transformers imports whenever it is installed: hand the name to it, found on sys.path without
    # this checkout, so that our directory never shadows it. Where there is none this stays an
    # empty package without a version, which transformers' probe (it imports what it finds)
    # takes for no usable `kernels`.
    import importlib.machinery as _machinery
    import importlib.util as _util

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is not None:
        _module = _util.module_from_spec(_spec)
        _sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds
        _spec.loader.exec_module(_module)
