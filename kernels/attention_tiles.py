"""Launch configurations of the reprogramming attention kernels, as data, and the choice of one
per launch: the only source of their tiles.

A launch is chosen by what it computes and where it runs: (role, data dtype, dot path, BLOCK_D,
BLOCK_E, dropout, GPU generation). `CONFIG_TABLE` holds every configuration a launcher can choose
on a GPU, and tests/test_aot.py compiles each one ahead of time for its GPU generation under every
Triton CI checks, so nothing dispatch can launch is unproven (docs/design.md, "GPUs and
toolchains"). Under Triton's interpreter (the CPU test suite) a launch takes the sm_80 entry of its
regime, with fp32 dots for bf16 data (and the prototype-logits kernels a wider BLOCK_S:
INTERPRETER_PROTOTYPE_BLOCK_S).

Roles: "fwd" (attention_fwd_kernel), "bwd_protos" and "bwd_rows" (the backward's prototype- and
row-stationary kernels; dropout is a run-time value there, so one build serves training with and
without it), "bwd_delta", "dropout_mask", and "prototype_logits" and "prototype_logits_bwd" (the
factorized mc from projected keys and its backward; fixed small tiles).

The tiles are keyed by the core's form (attention_form.py: BLOCK_D, BLOCK_E); which calls have a
kernel at all is decided there.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Dict, Optional, Tuple

import torch

from ._environment import device_capability, interpreting
from .host import SIG_DTYPE, TL_DTYPE, next_pow2

#: head widths the kernels accept; E is padded with masks up to the next block width
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128
BLOCK_E_CHOICES = (32, 64, 128)
#: widths of the factorized logit dots (d_model padded up to one of them). A wider d_model, or one
#: above E, runs the standard form (D = E): at d_model 33..64 the factorized form padded to 64
#: would save a quarter of the work at E = 128 at most, and no Time-LLM shape has such a d_model
FACTORIZED_BLOCK_D = (16, 32)
#: the prototype axis of the mc operand is padded to a multiple of this, so its rows start on 16-byte
#: boundaries (the kernels read them with 16-byte loads)
PROTOTYPE_ALIGN = 8
#: largest row block of any kernel; Philox row groups are multiples of it
MAX_BLOCK_R = 128
INT32_LIMIT = 2**31 - 1
#: GPU generations with their own tiles (75: Turing, 80: Ampere/Ada, 90: Hopper and newer)
ARCHS = (75, 80, 90)
INTERPRETER = 0  # the "arch" of a launch under TRITON_INTERPRET

#: (data dtype, dot dtype, input precision) each generation runs in the kernels, IEEE fp32 dots for
#: fp32 data. Turing has no bf16 MMA and its FMA kernels would lose to SDPA: bf16 and fp32 data run
#: eager there, and so do heads wider than TURING_MAX_BLOCK_E (its MMA lowering spills the wider
#: kernels even with 16-row tiles). fp32 with TF32 allowed runs eager too: PyTorch's SDPA already
#: runs fp32 on tensor cores, more accurately than TF32 (3xTF32).
DOT_PATHS = {
    75: ((torch.float16, torch.float16, "ieee"),),
    80: ((torch.float32, torch.float32, "ieee"), (torch.bfloat16, torch.bfloat16, "ieee"),
         (torch.float16, torch.float16, "ieee")),
    90: ((torch.float32, torch.float32, "ieee"), (torch.bfloat16, torch.bfloat16, "ieee"),
         (torch.float16, torch.float16, "ieee")),
}
TURING_MAX_BLOCK_E = 32
#: (BLOCK_D, BLOCK_E) pairs the tensor-core kernels take: factorized BLOCK_D in FACTORIZED_BLOCK_D,
#: standard BLOCK_D = BLOCK_E (one build serves both forms where they meet: the bias is a run-time
#: flag). The FMA (fp32) kernels spill at BLOCK_D 64 and 128 even with 16-row tiles: they take the
#: factorized widths only, and the standard form of fp32 at E >= 64 runs eager.
#: At E = 128 a 16-wide logit dot is padded to 32: the prototype-stationary backward's tiles that fit
#: there do as much MMA work at BLOCK_D 16 as at 32 (their D-wide products are MMA-padded).
BLOCK_PAIRS = tuple((d, e) for e in BLOCK_E_CHOICES for d in sorted(set(FACTORIZED_BLOCK_D + (e,)))
                    if d <= e and (d, e) != (16, 128))
FMA_BLOCK_PAIRS = tuple(p for p in BLOCK_PAIRS if p[0] in FACTORIZED_BLOCK_D)

# (BLOCK_R, BLOCK_S, num_warps, num_stages) per (role, arch, dropout) and (BLOCK_D, BLOCK_E), as data.
# The backward roles' dropout is None (a run-time value). Every entry compiles spill-free on its arch
# with Triton 3.6, 3.8 and 3.9 as the JIT specializes docs/spec.md §2 shapes, within its generation's shared
# memory (tests/test_aot.py), and was chosen by bench/aot_filter_tiles.py as the first candidate, in
# order of preference, clean under all three toolchains. The sm_90 tensor-core tiles also do no more
# MMA work per element than the factorized form's budget, except fp16's prototype pass at
# BLOCK_D = BLOCK_E = 128 (the standard form at E = 128): every tile within the budget spills under
# Triton 3.6 or 3.8 there, so it takes a BLOCK_S = 32 tile, half a warpgroup's MMA rows, 1.2x the
# budget. Regimes: "fma" = IEEE fp32 dots on the FMA units, whose
# operand layouts hold whole rows per thread (small tiles); "bf16", "fp16" = tensor-core MMA.
_HALF_TILES = {  # (role, arch, dropout) -> {(BLOCK_D, BLOCK_E): tile}, for bf16 and fp16 alike
    ('fwd', 80, False): {
        (16, 32): (128, 64, 8, 2), (16, 64): (128, 64, 8, 2), (32, 32): (128, 64, 8, 2), (32, 64): (128, 64, 8, 2),
        (32, 128): (64, 64, 4, 3), (64, 64): (128, 64, 8, 2), (128, 128): (32, 32, 4, 2)},
    ('fwd', 80, True): {
        (16, 32): (128, 64, 8, 2), (16, 64): (64, 64, 4, 3), (32, 32): (128, 64, 8, 2), (32, 64): (64, 32, 4, 2),
        (32, 128): (64, 32, 4, 2), (64, 64): (64, 32, 4, 2), (128, 128): (32, 32, 4, 2)},
    ('fwd', 90, False): {
        (16, 32): (128, 64, 8, 3), (16, 64): (128, 64, 8, 3), (32, 32): (128, 64, 8, 3), (32, 64): (128, 64, 8, 3),
        (32, 128): (128, 64, 8, 3), (64, 64): (128, 64, 8, 3), (128, 128): (128, 64, 8, 3)},
    ('fwd', 90, True): {
        (16, 32): (128, 64, 8, 2), (16, 64): (128, 32, 8, 2), (32, 32): (128, 64, 8, 2), (32, 64): (128, 32, 8, 2),
        (32, 128): (128, 64, 8, 3), (64, 64): (128, 32, 8, 2), (128, 128): (128, 64, 8, 3)},
    ('bwd_protos', 80, None): {
        (16, 32): (32, 64, 4, 2), (16, 64): (32, 64, 4, 2), (32, 32): (32, 64, 4, 2), (32, 64): (32, 32, 8, 2),
        (32, 128): (16, 64, 4, 2), (64, 64): (32, 32, 4, 2), (128, 128): (32, 32, 4, 2)},
    ('bwd_protos', 90, None): {
        (16, 32): (64, 128, 8, 2), (16, 64): (64, 128, 8, 1), (32, 32): (64, 128, 8, 2), (32, 64): (32, 64, 4, 2),
        (32, 128): (32, 64, 4, 2), (64, 64): (32, 128, 8, 2), (128, 128): (32, 128, 8, 2)},
    ('bwd_rows', 80, None): {
        (16, 32): (64, 64, 4, 2), (16, 64): (64, 32, 4, 2), (32, 32): (64, 32, 4, 2), (32, 64): (64, 32, 4, 2),
        (32, 128): (64, 32, 4, 2), (64, 64): (64, 32, 4, 2), (128, 128): (32, 32, 4, 2)},
    ('bwd_rows', 90, None): {
        (16, 32): (128, 64, 8, 2), (16, 64): (128, 64, 8, 2), (32, 32): (128, 64, 8, 2), (32, 64): (128, 64, 8, 2),
        (32, 128): (128, 64, 8, 2), (64, 64): (128, 64, 8, 2), (128, 128): (128, 32, 8, 2)},
}
_FP16_TILES = {  # fp16's own: Turing (no bf16 MMA there), and where fp16 differs from bf16
    ('fwd', 75, False): {
        (16, 32): (64, 32, 4, 2), (32, 32): (32, 16, 4, 1)},
    ('fwd', 75, True): {
        (16, 32): (64, 32, 4, 2), (32, 32): (32, 16, 4, 1)},
    ('bwd_protos', 75, None): {
        (16, 32): (32, 64, 4, 2), (32, 32): (32, 32, 4, 2)},
    ('bwd_protos', 90, None): {
        (128, 128): (16, 32, 4, 1)},
    ('bwd_rows', 75, None): {
        (16, 32): (32, 16, 4, 1), (32, 32): (32, 16, 4, 1)},
}
_FMA_TILES = {  # fp32 data: IEEE fp32 dots on the FMA units
    ('fwd', 80, False): {
        (16, 32): (64, 32, 8, 1), (16, 64): (64, 32, 8, 1), (32, 32): (32, 32, 8, 1), (32, 64): (32, 32, 8, 1),
        (32, 128): (32, 32, 8, 1)},
    ('fwd', 80, True): {
        (16, 32): (64, 32, 8, 1), (16, 64): (64, 32, 8, 1), (32, 32): (32, 32, 8, 1), (32, 64): (32, 32, 8, 1),
        (32, 128): (32, 32, 8, 1)},
    ('fwd', 90, False): {
        (16, 32): (64, 32, 8, 1), (16, 64): (64, 32, 8, 1), (32, 32): (32, 32, 8, 1), (32, 64): (32, 32, 8, 1),
        (32, 128): (32, 32, 8, 1)},
    ('fwd', 90, True): {
        (16, 32): (64, 32, 8, 1), (16, 64): (64, 32, 8, 1), (32, 32): (32, 32, 8, 1), (32, 64): (32, 32, 8, 1),
        (32, 128): (32, 32, 8, 1)},
    ('bwd_protos', 80, None): {
        (16, 32): (32, 32, 8, 1), (16, 64): (16, 16, 8, 1), (32, 32): (32, 32, 8, 1), (32, 64): (16, 32, 8, 1),
        (32, 128): (32, 32, 8, 1)},
    ('bwd_protos', 90, None): {
        (16, 32): (32, 32, 8, 1), (16, 64): (32, 32, 8, 1), (32, 32): (32, 32, 8, 1), (32, 64): (32, 32, 8, 1),
        (32, 128): (32, 32, 8, 1)},
    ('bwd_rows', 80, None): {
        (16, 32): (32, 32, 8, 1), (16, 64): (32, 32, 8, 1), (32, 32): (32, 32, 8, 1), (32, 64): (16, 16, 8, 1),
        (32, 128): (16, 16, 8, 1)},
    ('bwd_rows', 90, None): {
        (16, 32): (32, 32, 8, 1), (16, 64): (32, 32, 8, 1), (32, 32): (32, 16, 8, 1), (32, 64): (16, 16, 8, 1),
        (32, 128): (16, 16, 8, 1)},
}

_TILES: Dict[tuple, Dict[Tuple[int, int], Tuple[int, int, int, int]]] = {}
for (_role, _arch, _drop), _by_pair in _HALF_TILES.items():
    for _regime in ("bf16", "fp16"):
        _TILES[(_role, _regime, _arch, _drop)] = dict(_by_pair)
for (_role, _arch, _drop), _by_pair in _FP16_TILES.items():
    _TILES.setdefault((_role, "fp16", _arch, _drop), {}).update(_by_pair)
for (_role, _arch, _drop), _by_pair in _FMA_TILES.items():
    _TILES[(_role, "fma", _arch, _drop)] = dict(_by_pair)

#: The half-precision configurations' exponentials, by BLOCK_E: (eighths of the prototype groups whose
#: exponentials run as a polynomial on the FMA units, the forward's rescale threshold in base-2
#: units). fp32 keeps the exact MUFU.EX2 and rescales at every new maximum. From the sm_90 SASS
#: (bench/ROOFLINE.md, "Exponentials"): the forward issues ~11 instructions per element against
#: MUFU.EX2's equivalent of ~8.5, so it is bound by instruction issue, and the polynomial's ~8 more
#: per element cost more than the special-function units they relieve: no polynomial share yet. The
#: threshold saves the accumulator's rescale (E/BLOCK_S multiplies per element) for a block-wide
#: check: worth it at E >= 64, a wash at 32.
SOFTMAX_BY_BLOCK_E = {32: (0, 0.0), 64: (0, 8.0), 128: (0, 8.0)}

#: (BLOCK_R, BLOCK_E chunk, num_warps) of attention_bwd_delta_kernel, and (BLOCK_R, BLOCK_S, num_warps)
#: of the dropout-mask debug kernel
DELTA_TILE = (64, 32, 4)
DROPOUT_MASK_TILE = (64, 64, 4)
#: (BLOCK_S, num_warps) of prototype_logits_kernel, for every (BLOCK_D, BLOCK_E) of
#: KEYS_FIRST_BLOCK_PAIRS: the factorized form forms mc from the projected keys where E <= BLOCK_D + 1
#: (keys_first), so at most 33 wide heads, BLOCK_E <= 64. A few MFLOP
#: per layer call: one wave of small programs, whatever the dot path
PROTOTYPE_LOGITS_TILE = (32, 4)
#: (BLOCK_S, num_warps) of prototype_logits_bwd_kernel (one program per head walks the prototypes)
PROTOTYPE_LOGITS_BWD_TILE = (32, 4)
#: their BLOCK_S under the interpreter, which runs every op of a program in numpy, one Python call
#: per op and block, and has no registers to spill: a few wide blocks instead of many narrow ones
#: (the CPU suite runs these kernels on every training step, at S = 1000)
INTERPRETER_PROTOTYPE_BLOCK_S = 256
KEYS_FIRST_BLOCK_PAIRS = tuple(sorted({(d, max(BLOCK_E_CHOICES[0], next_pow2(e)))
                                       for d in FACTORIZED_BLOCK_D for e in range(MIN_HEAD_DIM, d + 2)}))


def regime(dot: torch.dtype, precision: str) -> str:
    if dot == torch.float32:
        return "fma"
    return SIG_DTYPE[dot]


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    role: str
    arch: int  # 75, 80, 90, or INTERPRETER
    data_dtype: torch.dtype
    dot_dtype: torch.dtype
    input_precision: str
    block_d: int
    block_e: int
    has_dropout: bool  # the forward's constexpr; False for roles where dropout is a run-time value
    block_r: int
    block_s: int
    num_warps: int
    num_stages: int
    poly_eighths: int = 0  # share of the exponentials computed by the polynomial, in eighths
    rescale_threshold: float = 0.0  # the forward's; 0: rescale at every new maximum

    @property
    def name(self) -> str:
        where = "interpreter" if self.arch == INTERPRETER else f"sm{self.arch}"
        if self.role == "dropout_mask":
            return f"reprogramming_dropout_mask[{where}]"
        if self.role == "bwd_delta":
            return f"reprogramming_bwd_delta[{SIG_DTYPE[self.data_dtype]},{where}]"
        dot = SIG_DTYPE[self.dot_dtype]
        drop = ",dropout" if self.has_dropout else ""
        return (f"reprogramming_{self.role}[{SIG_DTYPE[self.data_dtype]},dot={dot},D={self.block_d},"
                f"E={self.block_e}{drop},{where}]")

    @property
    def tile(self) -> Tuple[int, int, int, int]:
        return (self.block_r, self.block_s, self.num_warps, self.num_stages)

    def constexprs(self) -> Dict[str, object]:
        if self.role == "dropout_mask":
            return {"BLOCK_R": self.block_r, "BLOCK_S": self.block_s}
        if self.role == "bwd_delta":
            return {"BLOCK_R": self.block_r, "BLOCK_E": self.block_e, "BLOCK_X": 32}
        if self.role == "prototype_logits":
            return {"BLOCK_S": self.block_s, "BLOCK_D": self.block_d, "BLOCK_E": self.block_e,
                    "DOT_DTYPE": TL_DTYPE[self.dot_dtype], "INPUT_PRECISION": self.input_precision}
        if self.role == "prototype_logits_bwd":
            return {"BLOCK_S": self.block_s, "BLOCK_D": self.block_d, "BLOCK_E": self.block_e,
                    "DOT_DTYPE": TL_DTYPE[self.dot_dtype], "INPUT_PRECISION": self.input_precision,
                    "ROUND_TO_BF16": False}  # set under the interpreter by launch_params
        params = {"BLOCK_R": self.block_r, "BLOCK_S": self.block_s, "BLOCK_D": self.block_d,
                  "BLOCK_E": self.block_e, "DOT_DTYPE": TL_DTYPE[self.dot_dtype],
                  "INPUT_PRECISION": self.input_precision, "POLY_EIGHTHS": self.poly_eighths,
                  "ROUND_TO_BF16": False}  # the interpreter's stand-in for bf16 MMA: launch_params
        if self.role == "fwd":
            params.update(HAS_DROPOUT=self.has_dropout, RESCALE_THRESHOLD=self.rescale_threshold)
        return params


def block_e_for(head_dim: int) -> int:
    return max(BLOCK_E_CHOICES[0], next_pow2(head_dim))


def _config_table() -> Dict[tuple, AttentionConfig]:
    table: Dict[tuple, AttentionConfig] = {}
    for arch, paths in DOT_PATHS.items():
        for data_dtype, dot, precision in paths:
            for (role, tile_regime, tile_arch, dropout), tiles in _TILES.items():
                if tile_arch != arch or tile_regime != regime(dot, precision):
                    continue
                for (block_d, block_e), tile in tiles.items():
                    key = (role, arch, data_dtype, dot, precision, block_d, block_e, bool(dropout))
                    softmax = (0, 0.0) if data_dtype == torch.float32 else SOFTMAX_BY_BLOCK_E[block_e]
                    table[key] = AttentionConfig(role, arch, data_dtype, dot, precision, block_d, block_e,
                                                 bool(dropout), *tile, *softmax)
            for block_d, block_e in KEYS_FIRST_BLOCK_PAIRS:
                if arch == 75 and block_e > TURING_MAX_BLOCK_E:
                    continue
                for role, tile in (("prototype_logits", PROTOTYPE_LOGITS_TILE),
                                   ("prototype_logits_bwd", PROTOTYPE_LOGITS_BWD_TILE)):
                    table[(role, arch, data_dtype, dot, precision, block_d, block_e, False)] = AttentionConfig(
                        role, arch, data_dtype, dot, precision, block_d, block_e, False, 0, tile[0], tile[1], 1)
            table[("bwd_delta", arch, data_dtype)] = AttentionConfig(
                "bwd_delta", arch, data_dtype, data_dtype, "ieee", 0, DELTA_TILE[1], False, DELTA_TILE[0], 0,
                DELTA_TILE[2], 1)
        table[("dropout_mask", arch)] = AttentionConfig("dropout_mask", arch, torch.float32, torch.float32, "ieee",
                                                        0, 0, True, DROPOUT_MASK_TILE[0], DROPOUT_MASK_TILE[1],
                                                        DROPOUT_MASK_TILE[2], 1)
    return table


#: Every configuration a launcher can choose on a GPU, keyed by
#: (role, arch, data dtype, dot dtype, input precision, BLOCK_D, BLOCK_E, dropout); the interpreter
#: takes sm_80's (_choose_config)
CONFIG_TABLE: Dict[tuple, AttentionConfig] = _config_table()


def arch_class(device: torch.device) -> int:
    """The entry of ARCHS whose configurations serve this CUDA device."""
    major, minor = device_capability(device)
    return max(a for a in ARCHS if a <= max(10 * major + minor, ARCHS[0]))


def select_config(role: str, data_dtype: torch.dtype, form, has_dropout: bool, device: torch.device,
                  allow_tf32: bool = False) -> Optional[AttentionConfig]:
    """The configuration of one launch, or None where this GPU generation has no kernel for it.
    `form`: the core's (attention_form.CoreForm: its BLOCK_D and BLOCK_E key the tiles); None for the
    delta and mask roles, which have one tile per dtype."""
    block_d, block_e = (form.block_d, form.block_e) if form is not None else (0, 0)
    return _choose_config(role, data_dtype, block_d, block_e, bool(has_dropout), device, bool(allow_tf32),
                          interpreting())


@functools.lru_cache(maxsize=None)
def _choose_config(role: str, data_dtype: torch.dtype, block_d: int, block_e: int, has_dropout: bool,
                   device: torch.device, allow_tf32: bool, interpreted: bool) -> Optional[AttentionConfig]:
    """select_config, memoized by value: every launch asks, and the answer is a function of these
    arguments and CONFIG_TABLE (whose tuners clear the memo: forget_chosen_configs). Interpreted:
    the interpreter changes the dot dtype and the tiles."""
    gpu = device.type == "cuda" and not interpreted
    arch = arch_class(device) if gpu else 80  # the interpreter runs the sm_80 tiles
    if gpu and allow_tf32 and data_dtype == torch.float32:
        return None  # TF32 runs eager (DOT_PATHS)
    dot, precision = data_dtype, "ieee"
    if role == "dropout_mask":
        cfg = CONFIG_TABLE[("dropout_mask", arch)]
    elif role == "bwd_delta":
        cfg = CONFIG_TABLE.get(("bwd_delta", arch, data_dtype))
    else:
        drop = has_dropout and role == "fwd"
        cfg = CONFIG_TABLE.get((role, arch, data_dtype, dot, precision, block_d, block_e, drop))
    if cfg is None or gpu:
        return cfg
    # interpreter: bf16 runs on fp32 dots there (host.dot_dtype), tiles as on sm_80
    block_s = INTERPRETER_PROTOTYPE_BLOCK_S if role in ("prototype_logits", "prototype_logits_bwd") else cfg.block_s
    return dataclasses.replace(cfg, arch=INTERPRETER, block_s=block_s,
                               dot_dtype=torch.float32 if cfg.dot_dtype == torch.bfloat16 else cfg.dot_dtype)


#: forgets select_config's memo: for the tuners' hooks (bench/tile_overrides.py), which change
#: CONFIG_TABLE's entries inside a block and restore them
forget_chosen_configs = _choose_config.cache_clear


def launch_params(cfg: AttentionConfig) -> dict:
    """The keyword arguments of a launch with `cfg`: its constexprs, and num_warps, num_stages."""
    params = cfg.constexprs()
    if not interpreting():
        params.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    elif cfg.data_dtype == torch.bfloat16 and cfg.dot_dtype == torch.float32 and "ROUND_TO_BF16" in params:
        # bf16 data on fp32 dots only because the interpreter cannot multiply bf16: round the
        # computed operands (P, dZ) as the bf16 tensor-core path does
        params["ROUND_TO_BF16"] = True
    return params


def rows_per_philox_group(num_protos: int) -> int:
    """Largest multiple of MAX_BLOCK_R rows whose dropout counters (row·S + s, padding included) fit
    int32 (the Philox scheme: attention_device.py)."""
    rows = (INT32_LIMIT - MAX_BLOCK_R) // max(num_protos + MAX_BLOCK_R, 1)
    return (rows // MAX_BLOCK_R) * MAX_BLOCK_R
