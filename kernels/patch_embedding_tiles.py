"""Launch configurations of the patch embedding kernels: the only source of their tiles.

The launchers (kernels/patch_embedding_forward.py, patch_embedding_backward.py) pick only from
these tables, and tests/test_aot.py compiles every entry ahead of time for sm_75/80/90, so nothing
dispatch can choose is unproven on a GPU.

Kernels and their configurations: ``patch_window_fwd`` (WindowTile by dot dtype, BLOCK_C x BLOCK_O
from WINDOW_BLOCK_C x WINDOW_BLOCK_O: WindowFwdConfig), ``patch_window_dweight`` and
``patch_dweight_reduce`` (the DWEIGHT_* and REDUCE_* constants), ``patch_window_dx`` (DX_*), and
the gather fallback ``patch_conv_gemm`` (GemmConfig) and ``patch_fold`` (FOLD_*).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .host import PATCH_INPUT_PRECISION, TL_DTYPE, cdiv, next_pow2


@dataclass(frozen=True)
class WindowTile:
    """How patch_window_fwd is launched: rows per block, warps, software-pipeline stages, and the
    persistent grid's programs per SM (the grid is min(row blocks, programs_per_sm * SMs))."""
    block_m: int
    num_warps: int
    num_stages: int
    programs_per_sm: int

    @property
    def cache(self) -> str:
        # Pipelined loads become asynchronous copies, which skip L1 unless asked to cache there;
        # the taps re-read each window, so it must stay in L1.
        return ".ca" if self.num_stages > 1 else ""


#: The shipped forward tiles by dot dtype, on every GPU generation. Half precision: 4 warps over 64
#: rows (one warpgroup's MMA tile on Hopper), no software pipelining: the loop's loads are plain
#: 16-byte loads through L1, and latency is hidden by the 8 programs an SM holds at <= 64 registers.
#: fp32 (IEEE dots run on the FMA units): 8 warps, which 32-channel tiles need to stay spill-free
#: on sm_80. Chosen from SASS and register counts only: no GPU has timed them
#: (bench/tune_patch_embedding.py sweeps them, changing this table inside a block:
#: bench/tile_overrides.py).
WINDOW_FWD_TILES = {
    torch.bfloat16: WindowTile(block_m=64, num_warps=4, num_stages=1, programs_per_sm=8),
    torch.float16: WindowTile(block_m=64, num_warps=4, num_stages=1, programs_per_sm=8),
    torch.float32: WindowTile(block_m=64, num_warps=8, num_stages=1, programs_per_sm=4),
}
WINDOW_BLOCK_C = (16, 32)  # a whole patch per tile: patch_len <= 32 takes the windowed forward
WINDOW_BLOCK_O = (16, 32)  # output columns per program (more d_model: more column blocks)
DWEIGHT_BLOCK_M = 32
DWEIGHT_BLOCK_C = 16  # channel blocks are a grid axis: any patch_len
DWEIGHT_NUM_WARPS = 8  # 4 spill with the dropout mask on sm_90 (Triton 3.6)
DWEIGHT_NUM_STAGES = 3  # ~256 programs on a whole GPU: the row loop's loads must be pipelined
MAX_DW_CHUNKS = 256  # fixed (not SM-count) so dW is the same bits on every GPU
REDUCE_BLOCK_CHUNKS, REDUCE_BLOCK = 8, 256
DX_BLOCK_J = 32  # 64 spills with fp32 dots (sm_80/90)
DX_BLOCK_U = (16, 32)  # >= 2 * stride: stride <= 16 takes the windowed dx
DX_BLOCK_D = (16, 32)
DX_NUM_STAGES = 1  # the pipeliner's buffers for the d-loop's loads cost registers the loads do not need

# the gather fallback
GEMM_BLOCK_M = 64
GEMM_BLOCK_K = (16,)
GEMM_BLOCK_O = (16, 32)  # 64 spills under dropout (Philox on 4096 elements)
FOLD_BLOCK_R, FOLD_BLOCK_T = 16, 64
NUM_WARPS = 4
NUM_STAGES = 3  # patch_fold and patch_dweight_reduce: Triton's default, passed so every launch names its options


@dataclass(frozen=True)
class WindowFwdConfig:
    block_c: int
    block_o: int
    dot_dtype: torch.dtype
    dropout: bool
    tile: Optional[WindowTile] = None  # None: WINDOW_FWD_TILES[dot_dtype]

    def __post_init__(self):
        if self.tile is None:
            object.__setattr__(self, "tile", WINDOW_FWD_TILES[self.dot_dtype])

    def constexprs(self) -> dict:
        return dict(BLOCK_M=self.tile.block_m, BLOCK_C=self.block_c, BLOCK_O=self.block_o, CACHE=self.tile.cache,
                    DOT_DTYPE=TL_DTYPE[self.dot_dtype], INPUT_PRECISION=PATCH_INPUT_PRECISION,
                    DROPOUT=self.dropout)


@dataclass(frozen=True)
class GemmConfig:
    block_k: int
    block_o: int
    use_dot: bool
    dot_dtype: torch.dtype
    dropout: bool
    block_m: int = GEMM_BLOCK_M
    num_warps: int = NUM_WARPS

    @property
    def num_stages(self) -> int:
        # Triton 3.9's ptxas build of the fp32 dot with 3 stages spills on sm_90 (tests/test_aot.py);
        # the K loop runs 3 * c_in / BLOCK_K iterations, for which 2 stages already overlap loads
        return 2 if self.use_dot and self.dot_dtype == torch.float32 else 3

    def constexprs(self) -> dict:
        return dict(
            BLOCK_M=self.block_m, BLOCK_K=self.block_k, BLOCK_O=self.block_o, USE_DOT=self.use_dot,
            DOT_DTYPE=TL_DTYPE[self.dot_dtype], INPUT_PRECISION=PATCH_INPUT_PRECISION,
            DROPOUT=self.dropout,
        )


def windowed_forward(patch_len: int) -> bool:
    """Whether the forward takes patch_window_fwd (else the gather fallback)."""
    return patch_len <= WINDOW_BLOCK_C[-1]


def windowed_dx(stride: int) -> bool:
    """Whether dx takes patch_window_dx (else d(patches) by the gather, then patch_fold)."""
    return 2 * stride <= DX_BLOCK_U[-1]


def fit_block(n: int, blocks: tuple) -> int:
    """The smallest block of `blocks` >= n, else the largest."""
    return next((b for b in blocks if b >= n), blocks[-1])


def select_window_fwd_config(patch_len: int, d_model: int, dot_dt: torch.dtype, dropout: bool) -> WindowFwdConfig:
    return WindowFwdConfig(fit_block(patch_len, WINDOW_BLOCK_C), fit_block(d_model, WINDOW_BLOCK_O), dot_dt, dropout)


def select_gemm_config(k_total: int, out_cols: int, dot_dt: torch.dtype, dropout: bool) -> GemmConfig:
    use_dot = k_total >= 16
    block_k = min(GEMM_BLOCK_K[-1], next_pow2(k_total)) if use_dot else GEMM_BLOCK_K[0]
    block_o = min(GEMM_BLOCK_O[-1], max(GEMM_BLOCK_O[0], next_pow2(out_cols)))
    return GemmConfig(block_k, block_o, use_dot, dot_dt if use_dot else torch.float32, dropout)


def dweight_block_o(d_model: int, dropout: bool) -> int:
    # Regenerating the dropout mask (Philox) next to an fp32 dot spills at 32 columns.
    if dropout:
        return GEMM_BLOCK_O[0]
    return fit_block(d_model, GEMM_BLOCK_O)


def dweight_chunks(M: int) -> tuple:
    """(number of row chunks, rows per chunk) of the dW reduction: a function of M alone."""
    num_chunks = min(MAX_DW_CHUNKS, max(1, cdiv(M, DWEIGHT_BLOCK_M * 4)))
    rows_per_chunk = cdiv(cdiv(M, num_chunks), DWEIGHT_BLOCK_M) * DWEIGHT_BLOCK_M
    return cdiv(M, rows_per_chunk), rows_per_chunk
