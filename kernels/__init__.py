"""Triton kernels and their launchers, one file per fused op (installed as timellm_fast.kernels)."""
