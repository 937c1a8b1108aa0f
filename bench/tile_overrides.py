"""The tuners' hooks into the kernels' configurations (tune_attention.py, tune_patch_embedding.py,
and the tests of the polynomial exponentials and of other tiles in the interpreter): inside a block,
launches take other tiles or another share of polynomial exponentials; on exit the shipped tables
are back.

A tile set here has not been through tests/test_aot.py's ahead-of-time spill check. The blocks
edit the tables in place (kernels/attention_tiles.CONFIG_TABLE, whose select_config memo they
forget on entry and exit; kernels/patch_embedding_tiles.WINDOW_FWD_TILES, read on every launch);
they nest (the innermost wins) and are for one thread: tuning and tests only.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Dict, Iterator, Optional

import torch

from timellm_fast.kernels import attention_tiles as tiles
from timellm_fast.kernels import patch_embedding_tiles as pe_tiles
from timellm_fast.kernels.attention_tiles import AttentionConfig

TUNED_ROLES = ("fwd", "bwd_protos", "bwd_rows")


def tile_key(cfg: AttentionConfig) -> tuple:
    """What override_tiles addresses: (role, regime, BLOCK_D, BLOCK_E, dropout), every GPU
    generation (and the interpreter, which takes sm_80's entries) at once."""
    return (cfg.role, tiles.regime(cfg.dot_dtype, cfg.input_precision), cfg.block_d, cfg.block_e, cfg.has_dropout)


@contextlib.contextmanager
def _table_changed(table: dict, change: Callable, forget: Callable[[], None] = lambda: None) -> Iterator[None]:
    """`table` with change(entry) in place of each entry it returns one for, inside the block;
    forget() (a memo of choices from the table) on entry and exit."""
    shipped = dict(table)
    for key, entry in shipped.items():
        changed = change(entry)
        if changed is not None:
            table[key] = changed
    forget()
    try:
        yield
    finally:
        table.clear()
        table.update(shipped)
        forget()


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

    return _table_changed(tiles.CONFIG_TABLE, change, tiles.forget_chosen_configs)


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

    return _table_changed(tiles.CONFIG_TABLE, change, tiles.forget_chosen_configs)


#: the values patch_window_fwd's tile fields may take in a tuning run
WINDOW_TILE_CHOICES = dict(block_m=(16, 32, 64, 128, 256), num_warps=(1, 2, 4, 8, 16), num_stages=(1, 2, 3, 4))


def override_window_tile(tile: "pe_tiles.WindowTile"):
    """Launch patch_window_fwd with `tile` inside the block, whatever its dot dtype."""
    for field, allowed in WINDOW_TILE_CHOICES.items():
        if getattr(tile, field) not in allowed:
            raise ValueError(f"{field} must be one of {allowed}, got {getattr(tile, field)} in {tile}")
    if tile.programs_per_sm < 1:
        raise ValueError(f"programs_per_sm must be >= 1, got {tile.programs_per_sm}")
    return _table_changed(pe_tiles.WINDOW_FWD_TILES, lambda shipped: tile)
