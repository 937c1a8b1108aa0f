"""The tuners' hooks into the attention kernels' configurations (tune_attention.py, and the tests of
the polynomial exponentials and of other GPUs' tiles in the interpreter): inside a block, launches
take other tiles or another share of polynomial exponentials; on exit the shipped table is back.

A tile set here has not been through tests/test_aot.py's ahead-of-time spill check. The blocks
edit kernels/attention_tiles.CONFIG_TABLE in place and forget select_config's memo on entry and
exit; they nest (the innermost wins) and are for one thread: tuning and tests only.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterator, Optional

import torch

from timellm_fast.kernels import attention_tiles as tiles
from timellm_fast.kernels.attention_tiles import AttentionConfig

TUNED_ROLES = ("fwd", "bwd_protos", "bwd_rows")


def tile_key(cfg: AttentionConfig) -> tuple:
    """What override_tiles addresses: (role, regime, BLOCK_D, BLOCK_E, dropout), every GPU
    generation (and the interpreter, which takes sm_80's entries) at once."""
    return (cfg.role, tiles.regime(cfg.dot_dtype, cfg.input_precision), cfg.block_d, cfg.block_e, cfg.has_dropout)


@contextlib.contextmanager
def _table_changed(change: Callable[[AttentionConfig], Optional[AttentionConfig]]) -> Iterator[None]:
    """CONFIG_TABLE with change(cfg) in place of each entry it returns one for, inside the block."""
    shipped = dict(tiles.CONFIG_TABLE)
    for key, cfg in shipped.items():
        changed = change(cfg)
        if changed is not None:
            tiles.CONFIG_TABLE[key] = changed
    tiles.forget_chosen_configs()
    try:
        yield
    finally:
        tiles.CONFIG_TABLE.clear()
        tiles.CONFIG_TABLE.update(shipped)
        tiles.forget_chosen_configs()


def override_tiles(overrides: Dict[tuple, tuple]):
    """Launch with other tiles inside the block. Keys: tile_key's (role, regime, BLOCK_D, BLOCK_E,
    dropout), dropout False for the backward roles; values (BLOCK_R, BLOCK_S, num_warps, num_stages)."""
    for key, tile in overrides.items():
        if len(key) != 5 or key[0] not in TUNED_ROLES:
            raise KeyError(f"no such tile key {key}; keys look like ('fwd', 'bf16', 32, 128, False)")
        if len(tile) != 4 or tile[0] > tiles.MAX_BLOCK_R:
            raise ValueError(f"tile {tile} must be (BLOCK_R <= {tiles.MAX_BLOCK_R}, BLOCK_S, num_warps, num_stages)")

    def change(cfg: AttentionConfig) -> Optional[AttentionConfig]:
        tile = overrides.get(tile_key(cfg)) if cfg.role in TUNED_ROLES else None
        if tile is None:
            return None
        return dataclasses.replace(cfg, block_r=tile[0], block_s=tile[1], num_warps=tile[2], num_stages=tile[3])

    return _table_changed(change)


def override_softmax(poly_eighths: int, rescale_threshold: float):
    """Every half-precision launch inside the block computes poly_eighths/8 of its exponentials by
    the polynomial and rescales at that threshold (fp32 keeps the exact path)."""
    if not 0 <= poly_eighths <= 8 or not 0.0 <= rescale_threshold <= 15.0:
        raise ValueError(f"poly_eighths must be in 0..8 and rescale_threshold in [0, 15] (fp16 holds 2^15), "
                         f"got {poly_eighths}, {rescale_threshold}")

    def change(cfg: AttentionConfig) -> Optional[AttentionConfig]:
        if cfg.role not in TUNED_ROLES or cfg.data_dtype == torch.float32:
            return None
        return dataclasses.replace(cfg, poly_eighths=int(poly_eighths), rescale_threshold=float(rescale_threshold))

    return _table_changed(change)
