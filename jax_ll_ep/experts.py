"""Expert matmuls on the dispatch layout: a masked grouped matmul and the SwiGLU expert MLP built on it.

``dispatch`` returns ``recv_x [E_l, M, K]`` (M = R*T rows of capacity per local expert) and ``recv_count [E_l]``;
only ``recv_count[e]`` rows of expert ``e`` are tokens. A dense ``einsum`` over that layout multiplies every row of
capacity (M = 1,024 at the standard decode point, against about 32 valid rows per expert) and, worse, every
elementwise op between the matmuls reads and writes the whole capacity. The ops here follow the valid rows instead:

- a program of the kernel owns one (expert, column block) and walks that expert's blocks of ``block_m`` valid rows
  (``row_programs`` programs share the walk, see :class:`GroupedMatmulConfig`), so the work follows the count;
- rows at or past the count are never loaded (masked loads) and their outputs are never written (masked stores):
  they may hold NaN or garbage on input, and hold whatever the output buffer held on output;
- at decode an expert has one block of rows, so every weight tile is read exactly once; the SwiGLU activation runs
  in the first matmul's epilogue, so nothing of capacity size is read or written between the matmuls.

On GPUs the kernel is a Pallas kernel lowered through Triton (it ships inside jax: no dependency beyond jax). On
other platforms ``implementation="auto"`` runs a masked ``einsum`` reference with the same contract, and
``implementation="pallas"`` runs the very kernel in Pallas's interpreter (slow; it is how CI tests the kernel).

Weights are ``[E_l, K, N]`` (``w_layout="kn"``, the default) or ``[E_l, N, K]`` (``w_layout="nk"``: output
features first, as a PyTorch ``Linear`` and the DeepSeek-V3 checkpoint store them). Both run at the same speed in
bfloat16; fp8 weights should be ``"nk"``, the layout Hopper's fp8 tensor-core instructions read directly.

FP8: ``x`` may be the :class:`~jax_ll_ep.Fp8Array` that fp8 dispatch returns (e4m3 data, one scale per row and
128 channels, in any of the three scale formats) and ``w`` may be fp8 with one scale per 128x128 block
(``Fp8Array(data, scale)`` with ``scale`` ``[E_l, K/128, N/128]``, or ``[E_l, N/128, K/128]`` for ``"nk"``). Each
``block_k``-deep step of the contraction is multiplied on the tensor cores in its stored precision (fp8 x fp8, or
bf16 when one side is bf16, the fp8 side widened in registers), accumulated in float32 and scaled once per step:
nothing is dequantized in memory first.

Autodiff: ``jax.grad`` flows to ``x`` and ``w`` for bf16 operands (the backward passes are the same kernels: the
weights read in the other layout for ``dx``, a row-masked ``x^T dy`` per expert for ``dw``); fp8 operands are
forward-only and raise ``NotImplementedError`` if differentiated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .config import SCALE_BLOCK
from .types import Fp8Array

IMPLEMENTATIONS = ("auto", "pallas", "reference")
W_LAYOUTS = ("kn", "nk")
OUT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
_FP8 = jnp.dtype(jnp.float8_e4m3fn)
_UE8M0 = jnp.dtype(jnp.float8_e8m0fnu)
# Programs the default tiles aim for (two per multiprocessor of an H100/H200), so that a few experts with wide
# weights still fill the GPU at decode.
_TARGET_PROGRAMS = 2 * 132

Implementation = Literal["auto", "pallas", "reference"]
WLayout = Literal["kn", "nk"]


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """Tiles and launch parameters of the kernel; ``None`` fields take the defaults of :func:`default_config`.

    ``block_m`` valid rows of one expert per step of a program (at least 16, the tensor-core tile), ``block_n``
    output columns per program, ``block_k`` the contraction step (at most 128 with fp8 operands: one scale per
    step). ``row_programs``: how many programs share one (expert, column block): each takes every
    ``row_programs``-th block of the expert's valid rows. 1 launches no program that finds no rows; more run the row
    blocks of one weight tile side by side, so they share it through L2 when experts have many rows (on an H200 the
    default, 4, costs about 16 µs more than 1 at zero rows and is 1.5x faster at 128 rows per expert).
    ``num_warps`` and ``num_stages`` (software pipelining depth of the contraction loop) go to Triton. All sizes but
    ``num_stages`` are powers of two.

    ``swap_ab`` computes each tile transposed (weights as the left operand, the few rows as the right one), so the
    tensor-core tile's large side is spent on weight columns rather than on rows that may not exist. ``fp8_mma``
    (both operands fp8): multiply in fp8 on the tensor cores and scale each step's product (True), or widen both
    operands to bf16 in registers with their scales folded in and accumulate on the tensor cores directly (False;
    one side fp8 is always widened this way).
    """

    block_m: int | None = None
    block_n: int | None = None
    block_k: int | None = None
    row_programs: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    swap_ab: bool | None = None
    fp8_mma: bool | None = None

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if value is None:
                continue
            if name in ("swap_ab", "fp8_mma"):
                if not isinstance(value, bool):
                    raise ValueError(f"GroupedMatmulConfig.{name}={value!r} must be a bool or None")
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GroupedMatmulConfig.{name}={value!r} must be a positive int or None")
            if name not in ("num_stages", "row_programs") and value & (value - 1):
                raise ValueError(f"GroupedMatmulConfig.{name}={value} must be a power of two")
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value is not None and value < 16:
                raise ValueError(f"GroupedMatmulConfig.{name}={value} must be at least 16 (the tensor-core tile)")


def _largest_pow2_divisor(value: int, cap: int) -> int:
    block = cap
    while block > 1 and value % block:
        block //= 2
    return block


def default_config(e: int, m: int, k: int, n: int, *, x_fp8: bool, w_fp8: bool) -> GroupedMatmulConfig:
    """The tiles used where ``config`` leaves a field unset, chosen by measurement on an H200 (docs/performance.md,
    "Grouped matmul"): 64 rows, the widest column block up to 128 that still gives every multiprocessor two
    programs, a 64-deep contraction step, 4 programs sharing each expert's row blocks, 4 warps, 4 stages; with both
    operands fp8, 32 rows on the tensor cores' narrow side (``swap_ab``), fp8 products and a 128-deep step (one
    scale per step)."""
    block_n = _largest_pow2_divisor(n, 128)
    while block_n > 32 and e * (n // block_n) < _TARGET_PROGRAMS and n % (block_n // 2) == 0:
        block_n //= 2
    both_fp8 = x_fp8 and w_fp8
    return GroupedMatmulConfig(
        block_m=min(32 if both_fp8 else 64, max(16, pl.next_power_of_2(m))),
        block_n=block_n,
        block_k=SCALE_BLOCK if both_fp8 else _largest_pow2_divisor(k, 64),
        row_programs=4,
        num_warps=4,
        num_stages=4,
        swap_ab=both_fp8,
        fp8_mma=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# Operands: what the kernel is told about each one (static), and the checks that name the bad value
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Format:
    """Static description of one operand: ``fp8`` (e4m3 data with scales) and the scale's encoding."""

    fp8: bool = False
    ue8m0: bool = False  # scale stored as UE8M0 exponent bytes (float8_e8m0fnu), else float32


_BF16 = _Format()


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about one kernel call."""

    xf: _Format
    wf: _Format
    gated: bool  # two weights; the output is silu(x @ w0) * (x @ w1)
    w_nk: bool  # weights stored [E, N, K] (else [E, K, N])
    out_dtype: jnp.dtype


def _operand(name: str, value) -> tuple[jax.Array, jax.Array | None, _Format]:
    if isinstance(value, Fp8Array):
        data, scale = value
        if data.dtype != _FP8:
            raise TypeError(f"{name}.data has dtype {data.dtype}; allowed: float8_e4m3fn")
        if scale.dtype not in (jnp.dtype(jnp.float32), _UE8M0):
            raise TypeError(f"{name}.scale has dtype {scale.dtype}; allowed: float32 or float8_e8m0fnu (UE8M0)")
        return data, scale, _Format(fp8=True, ue8m0=scale.dtype == _UE8M0)
    if not hasattr(value, "dtype") or not hasattr(value, "shape"):
        raise TypeError(f"{name} must be a bfloat16 array or a jax_ll_ep.Fp8Array, got {type(value).__name__}")
    if value.dtype != jnp.bfloat16:
        raise TypeError(
            f"{name} has dtype {value.dtype}; allowed: bfloat16, or a jax_ll_ep.Fp8Array (float8_e4m3fn data with "
            f"scales). Cast with {name}.astype(jnp.bfloat16)."
        )
    return value, None, _BF16


def _check_shapes(x, xs, xf: _Format, w_name: str, w, ws, wf: _Format, counts, w_nk: bool) -> int:
    """Checks one weight against x and counts; returns N."""
    if x.ndim != 3:
        raise ValueError(f"x must be [E_l, M, K] (the dispatch layout), got shape {tuple(x.shape)}")
    e, m, k = x.shape
    want = f"[{e}, N, {k}]" if w_nk else f"[{e}, {k}, N]"
    layout = "w_layout='nk': [E_l, N, K]" if w_nk else "w_layout='kn': [E_l, K, N]"
    if w.ndim != 3 or w.shape[0] != e or w.shape[2 if w_nk else 1] != k:
        raise ValueError(
            f"{w_name} has shape {tuple(w.shape)}; with x of shape {tuple(x.shape)} and {layout} it must be {want}"
        )
    if not hasattr(counts, "dtype") or counts.dtype != jnp.int32 or counts.shape != (e,):
        got = f"{getattr(counts, 'dtype', type(counts).__name__)}{list(getattr(counts, 'shape', ()))}"
        raise ValueError(f"counts must be int32[{e}] (dispatch's recv_count, one per local expert), got {got}")
    n = w.shape[1 if w_nk else 2]
    if (xf.fp8 or wf.fp8) and k % SCALE_BLOCK:
        raise ValueError(f"K={k} must be a multiple of {SCALE_BLOCK} when x or {w_name} is fp8 (one scale per block)")
    if xf.fp8 and xs.shape != (e, m, k // SCALE_BLOCK):
        raise ValueError(
            f"x.scale has shape {tuple(xs.shape)}; allowed: [{e}, {m}, {k // SCALE_BLOCK}] (one per row and "
            f"{SCALE_BLOCK} channels)"
        )
    if wf.fp8:
        if n % SCALE_BLOCK:
            raise ValueError(f"N={n} must be a multiple of {SCALE_BLOCK} for fp8 {w_name} (128x128 block scales)")
        blocks = (n // SCALE_BLOCK, k // SCALE_BLOCK) if w_nk else (k // SCALE_BLOCK, n // SCALE_BLOCK)
        if ws.shape != (e, *blocks):
            raise ValueError(
                f"{w_name}.scale has shape {tuple(ws.shape)}; allowed: [{e}, {blocks[0]}, {blocks[1]}] (one per "
                f"{SCALE_BLOCK}x{SCALE_BLOCK} block of each expert's weights, in the layout of the data)"
            )
    return n


# The Pallas Triton lowering (jax 0.11) addresses an array through 32-bit signed element offsets whenever the array
# holds at most 2^32 bytes, so a one-byte (fp8) array of more than 2^31 elements (and at most 2^32) wraps and the
# kernel reads memory before it (fp8 weights of more than 146 DeepSeek-V3 experts in one array). Wider dtypes and
# larger arrays are addressed correctly. Refused at trace time on every platform, so a program that passes on a CPU
# does not compute garbage on a GPU.
_WRAPPING_ELEMENTS = (2**31, 2**32)


def _check_addressable(implementation: str, operands) -> None:
    if implementation == "reference":
        return
    for name, data in operands:
        if jnp.dtype(data.dtype).itemsize == 1 and _WRAPPING_ELEMENTS[0] < data.size <= _WRAPPING_ELEMENTS[1]:
            per_expert = data.size // data.shape[0]
            raise ValueError(
                f"{name} holds {data.size:,} one-byte (fp8) elements, {tuple(data.shape)}; the grouped-matmul kernel "
                f"(Pallas lowered through Triton, jax {jax.__version__}) addresses one-byte arrays of 2^31 to 2^32 "
                f"elements with 32-bit signed offsets and would read the wrong memory. Pass at most "
                f"{_WRAPPING_ELEMENTS[0] // per_expert} experts of this shape per call (split the expert axis into "
                "separate arrays and call once per group), or implementation='reference'."
            )


def _check_options(implementation, out_dtype, config, w_layout) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}")
    if jnp.dtype(out_dtype) not in OUT_DTYPES:
        raise ValueError(f"out_dtype={jnp.dtype(out_dtype)} is not allowed; allowed: bfloat16, float32")
    if config is not None and not isinstance(config, GroupedMatmulConfig):
        raise TypeError(f"config must be a GroupedMatmulConfig or None, got {type(config).__name__}")
    if w_layout not in W_LAYOUTS:
        raise ValueError(f"w_layout={w_layout!r} is not one of {W_LAYOUTS} ('kn': [E_l, K, N]; 'nk': [E_l, N, K])")


def _resolve_config(config, spec: _Spec, e, m, k, n) -> GroupedMatmulConfig:
    """The default tiles overridden by the fields ``config`` sets, checked against the shapes (at trace time)."""
    if k % 16 or n % 16:
        raise ValueError(f"grouped_matmul needs K and N multiples of 16 (the tensor-core tile), got K={k}, N={n}")
    cfg = default_config(e, m, k, n, x_fp8=spec.xf.fp8, w_fp8=spec.wf.fp8)
    if config is not None:
        cfg = dataclasses.replace(cfg, **{f: v for f, v in dataclasses.asdict(config).items() if v is not None})
    if k % cfg.block_k:
        raise ValueError(f"K={k} must be a multiple of block_k={cfg.block_k}")
    if n % cfg.block_n:
        raise ValueError(f"N={n} must be a multiple of block_n={cfg.block_n}")
    if (spec.xf.fp8 or spec.wf.fp8) and cfg.block_k > SCALE_BLOCK:
        raise ValueError(f"block_k={cfg.block_k} must be at most {SCALE_BLOCK} with fp8 operands (one scale a step)")
    if spec.wf.fp8 and cfg.block_n > SCALE_BLOCK:
        raise ValueError(f"block_n={cfg.block_n} must be at most {SCALE_BLOCK} with fp8 weights")
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------------------------
def _scale_to_f32(s: jax.Array, ue8m0: bool) -> jax.Array:
    if not ue8m0:
        return s
    # A UE8M0 byte b is the float 2^(b - 127): its bits, shifted into a float32's exponent field.
    return jax.lax.bitcast_convert_type(jnp.left_shift(s.astype(jnp.int32), 23), jnp.float32)


def _silu(v: jax.Array) -> jax.Array:
    return v / (1.0 + jnp.exp(-v))


def _load_valid(view, mask):
    """Loads ``view`` where ``mask`` holds, zeros elsewhere: masked elements are never read from memory."""
    return plgpu.load(view, mask=mask, other=jnp.zeros((), view.dtype))


def _gmm_kernel(counts_ref, *refs, spec: _Spec, cfg: GroupedMatmulConfig, k_size: int):
    """Program (g, j, e): expert e's output columns [j*block_n, (j+1)*block_n), for its row blocks g, g + G, ...
    (G = row_programs) below its count. refs: x data, [x scale], then per weight data, [scale]; then the output."""
    refs = list(refs)
    x_ref = refs.pop(0)
    xs_ref = refs.pop(0) if spec.xf.fp8 else None
    weights = [(refs.pop(0), refs.pop(0) if spec.wf.fp8 else None) for _ in range(2 if spec.gated else 1)]
    (o_ref,) = refs
    bm, bn, bk, step = cfg.block_m, cfg.block_n, cfg.block_k, cfg.row_programs
    g, j, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count = jnp.clip(counts_ref[e], 0, o_ref.shape[1])  # a count outside [0, M] never reaches past the layout
    n0 = pl.multiple_of(j * bn, bn)
    row_blocks = jnp.maximum(pl.cdiv(pl.cdiv(count, bm) - g, step), 0)

    def row_block(i, carry):
        m0 = (g + i * step) * bm
        rows_ok = (m0 + jnp.arange(bm)) < count

        def product(rows, w_tile, acc):
            """acc + rows @ w; the tile transposed ([bn, bm]) with swap_ab. w_tile is [bn, bk] ("nk") or [bk, bn]."""
            if cfg.swap_ab:
                lhs = w_tile if spec.w_nk else w_tile.T
                return acc + jnp.dot(lhs, rows.T, preferred_element_type=jnp.float32)
            rhs = w_tile.T if spec.w_nk else w_tile
            return acc + jnp.dot(rows, rhs, preferred_element_type=jnp.float32)

        def k_step(kb, accs):
            k0 = pl.multiple_of(kb * bk, bk)
            # Rows past the count are never loaded: they may hold NaN (dispatch leaves them unspecified).
            a = _load_valid(x_ref.at[e, pl.ds(m0, bm), pl.ds(k0, bk)], rows_ok[:, None])
            row_scale = None
            if spec.xf.fp8:
                s = _load_valid(xs_ref.at[e, pl.ds(m0, bm), k0 // SCALE_BLOCK], rows_ok)
                row_scale = _scale_to_f32(s, spec.xf.ue8m0)
            native = spec.xf.fp8 and spec.wf.fp8 and cfg.fp8_mma
            if spec.xf.fp8 and not native:  # widened in registers, its scale folded in (exact for power-of-two)
                a = (a.astype(jnp.float32) * row_scale[:, None]).astype(jnp.bfloat16)
            new = []
            for (w_ref, ws_ref), acc in zip(weights, accs, strict=True):
                if spec.w_nk:  # [bn, bk], contiguous along k: the operand layout fp8 tensor cores read
                    w_tile = w_ref[e, pl.ds(n0, bn), pl.ds(k0, bk)]
                else:
                    w_tile = w_ref[e, pl.ds(k0, bk), pl.ds(n0, bn)]
                w_scale = None
                if spec.wf.fp8:
                    nb, kb_ = n0 // SCALE_BLOCK, k0 // SCALE_BLOCK
                    w_scale = _scale_to_f32(ws_ref[e, nb, kb_] if spec.w_nk else ws_ref[e, kb_, nb], spec.wf.ue8m0)
                if native:  # fp8 x fp8 on the tensor cores, this step's product scaled before it is added
                    scale = row_scale[None, :] if cfg.swap_ab else row_scale[:, None]
                    part = product(a, w_tile, jnp.zeros_like(acc))
                    new.append(acc + part * (scale * w_scale))
                    continue
                if spec.wf.fp8:
                    w_tile = (w_tile.astype(jnp.float32) * w_scale).astype(jnp.bfloat16)
                new.append(product(a, w_tile, acc))
            return tuple(new)

        tile = (bn, bm) if cfg.swap_ab else (bm, bn)
        zeros = tuple(jnp.zeros(tile, jnp.float32) for _ in weights)
        accs = jax.lax.fori_loop(0, k_size // bk, k_step, zeros)
        out = _silu(accs[0]) * accs[1] if spec.gated else accs[0]
        out = out.T if cfg.swap_ab else out
        # Rows past the count are not written: their outputs are unspecified (documented).
        plgpu.store(o_ref.at[e, pl.ds(m0, bm), pl.ds(n0, bn)], out.astype(o_ref.dtype), mask=rows_ok[:, None])
        return carry

    jax.lax.fori_loop(0, row_blocks, row_block, 0)


def _bits(scale: jax.Array) -> jax.Array:
    """UE8M0 scales travel as their bytes (Triton has no e8m0 type); float32 scales as they are."""
    return jax.lax.bitcast_convert_type(scale, jnp.uint8) if scale.dtype == _UE8M0 else scale


def _out_shape(shape, dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """The output varies over the mesh axes ``like`` varies over (required inside ``shard_map`` with check_vma)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _launch_gmm(spec: _Spec, config, interpret: bool, counts, x, xs, ws_list):
    """Runs ``_gmm_kernel``; ``ws_list`` holds (data, scale) per weight (two for the gated SwiGLU product)."""
    e, m, k = x.shape
    w0 = ws_list[0][0]
    n = w0.shape[1] if spec.w_nk else w0.shape[2]
    cfg = _resolve_config(config, spec, e, m, k, n)
    operands = [x] + ([_bits(xs)] if spec.xf.fp8 else [])
    for data, scale in ws_list:
        operands += [data] + ([_bits(scale)] if spec.wf.fp8 else [])
    # Row-block programs of one (expert, column block) are adjacent in launch order, so they run side by side.
    grid = (min(cfg.row_programs, pl.cdiv(m, cfg.block_m)), n // cfg.block_n, e)
    return pl.pallas_call(
        functools.partial(_gmm_kernel, spec=spec, cfg=cfg, k_size=k),
        out_shape=_out_shape((e, m, n), spec.out_dtype, x),
        grid=grid,
        in_specs=[pl.no_block_spec] * (1 + len(operands)),
        out_specs=pl.no_block_spec,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="jax_ll_ep_grouped_matmul",
    )(counts, *operands)


def _wgrad_kernel(counts_ref, a_ref, b_ref, out_ref, *, bm: int, bp: int, bq: int):
    """out[e][p-block, q-block] = sum over the valid rows m of a[e, m, p-block]^T b[e, m, q-block]."""
    pt, qt, e = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count = jnp.clip(counts_ref[e], 0, a_ref.shape[1])  # a count outside [0, M] never reaches past the layout
    p0 = pl.multiple_of(pt * bp, bp)
    q0 = pl.multiple_of(qt * bq, bq)

    def step(mb, acc):
        m0 = mb * bm
        rows_ok = (m0 + jnp.arange(bm)) < count
        a = _load_valid(a_ref.at[e, pl.ds(m0, bm), pl.ds(p0, bp)], rows_ok[:, None])
        b = _load_valid(b_ref.at[e, pl.ds(m0, bm), pl.ds(q0, bq)], rows_ok[:, None])
        return acc + jnp.dot(a.T, b, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, pl.cdiv(count, bm), step, jnp.zeros((bp, bq), jnp.float32))
    out_ref[e, pl.ds(p0, bp), pl.ds(q0, bq)] = acc.astype(out_ref.dtype)


def _launch_wgrad(interpret: bool, counts, a, b):
    """``[E, P, Q]`` bf16: per expert, a's valid rows transposed times b's ([E, M, P] and [E, M, Q])."""
    e, _, p = a.shape
    q = b.shape[2]
    bp, bq = _largest_pow2_divisor(p, 64), _largest_pow2_divisor(q, 64)
    return pl.pallas_call(
        functools.partial(_wgrad_kernel, bm=32, bp=bp, bq=bq),
        out_shape=_out_shape((e, p, q), jnp.bfloat16, a),
        grid=(p // bp, q // bq, e),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.no_block_spec,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="jax_ll_ep_grouped_matmul_wgrad",
    )(counts, a, b)


# ---------------------------------------------------------------------------------------------------------------
# The reference: a masked einsum with the same contract
# ---------------------------------------------------------------------------------------------------------------
def _widen(data, scale, fmt: _Format, scale_axes: tuple[int, ...]) -> jax.Array:
    """The operand's value in float32: fp8 data times its block scale, repeated 128 times along ``scale_axes``."""
    if not fmt.fp8:
        return data.astype(jnp.float32)
    s = _scale_to_f32(_bits(scale), fmt.ue8m0)
    for axis in scale_axes:
        s = jnp.repeat(s, SCALE_BLOCK, axis=axis)
    return data.astype(jnp.float32) * s


def _valid_rows(counts: jax.Array, m: int) -> jax.Array:
    return (jnp.arange(m)[None, :] < counts[:, None])[:, :, None]  # [E, M, 1]


def _reference_gmm(spec: _Spec, counts, x, xs, ws_list):
    xv = jnp.where(_valid_rows(counts, x.shape[1]), _widen(x, xs, spec.xf, (2,)), 0.0)  # NaN past the count cannot leak
    eq = "emk,enk->emn" if spec.w_nk else "emk,ekn->emn"
    hi = jax.lax.Precision.HIGHEST
    prods = [jnp.einsum(eq, xv, _widen(d, s, spec.wf, (1, 2)), precision=hi) for d, s in ws_list]
    out = _silu(prods[0]) * prods[1] if spec.gated else prods[0]
    return jnp.where(_valid_rows(counts, x.shape[1]), out, 0.0).astype(spec.out_dtype)


def _reference_wgrad(counts, a, b):
    mask = _valid_rows(counts, a.shape[1])
    av = jnp.where(mask, a.astype(jnp.float32), 0.0)
    bv = jnp.where(mask, b.astype(jnp.float32), 0.0)
    return jnp.einsum("emp,emq->epq", av, bv, precision=jax.lax.Precision.HIGHEST).astype(jnp.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Choosing the implementation per platform
# ---------------------------------------------------------------------------------------------------------------
def _per_platform(implementation: str, kernel_fn, reference_fn, *args):
    """``kernel_fn(interpret, *args)`` on GPUs; elsewhere the reference ("auto") or the interpreted kernel."""
    if implementation == "reference":
        return reference_fn(*args)
    other = reference_fn if implementation == "auto" else functools.partial(kernel_fn, True)
    return jax.lax.platform_dependent(*args, cuda=functools.partial(kernel_fn, False), default=other)


def _product(spec: _Spec, config, implementation, counts, x, xs, ws_list):
    return _per_platform(
        implementation,
        functools.partial(_launch_gmm, spec, config),
        functools.partial(_reference_gmm, spec),
        counts,
        x,
        xs,
        ws_list,
    )


def _wgrad(implementation, counts, a, b):
    return _per_platform(implementation, _launch_wgrad, _reference_wgrad, counts, a, b)


# ---------------------------------------------------------------------------------------------------------------
# Autodiff (bf16 only)
# ---------------------------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _product_bf16(spec, config, implementation, counts, x, ws):
    return _product(spec, config, implementation, counts, x, None, [(w, None) for w in ws])


def _product_bf16_fwd(spec, config, implementation, counts, x, ws):
    return _product_bf16(spec, config, implementation, counts, x, ws), (counts, x, ws)


def _product_bf16_bwd(spec, config, implementation, residuals, dout):
    counts, x, ws = residuals

    def times(w, t, w_nk):  # t [E, M, *] times each expert's w; rows past the count of the result unspecified
        plain = _Spec(xf=_BF16, wf=_BF16, gated=False, w_nk=w_nk, out_dtype=jnp.dtype(jnp.float32))
        return _product(plain, None, implementation, counts, t, None, [(w, None)])

    dout = dout.astype(jnp.float32)
    if spec.gated:
        g, u = times(ws[0], x, spec.w_nk), times(ws[1], x, spec.w_nk)  # recomputed rather than kept from forward
        sig = jax.nn.sigmoid(g)
        douts = [dout * u * sig * (1.0 + g * (1.0 - sig)), dout * g * sig]
    else:
        douts = [dout]
    douts = [d.astype(jnp.bfloat16) for d in douts]
    # dx = dout @ w^T: the weights read in the other layout.
    dx = sum(times(w, d, not spec.w_nk) for w, d in zip(ws, douts, strict=True))
    dx = jnp.where(_valid_rows(counts, x.shape[1]), dx, 0.0).astype(x.dtype)  # rows past the count: no gradient
    # dw = x^T dout over the valid rows ([E, K, N]), or its transpose for [E, N, K] weights.
    dws = tuple(
        _wgrad(implementation, counts, d, x) if spec.w_nk else _wgrad(implementation, counts, x, d) for d in douts
    )
    return None, dx, dws


_product_bf16.defvjp(_product_bf16_fwd, _product_bf16_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def _product_fp8(spec, config, implementation, counts, x, xs, ws_list):
    return _product(spec, config, implementation, counts, x, xs, ws_list)


@_product_fp8.defjvp
def _product_fp8_jvp(spec, config, implementation, primals, tangents):
    del spec, config, implementation, primals, tangents
    raise NotImplementedError(
        "jax_ll_ep.grouped_matmul with fp8 operands is forward-only (the e4m3 values have no useful derivative); "
        "differentiate with bfloat16 x and w, or stop the gradient (jax.lax.stop_gradient) at the fp8 operands"
    )


def _apply(x, weights, counts, *, names, gated, out_dtype, w_layout, config, implementation):
    _check_options(implementation, out_dtype, config, w_layout)
    w_nk = w_layout == "nk"
    xd, xs, xf = _operand("x", x)
    ws_list, wf, n = [], None, None
    for name, w in zip(names, weights, strict=True):
        wd, wsc, fmt = _operand(name, w)
        if wf is not None and (fmt != wf or wd.shape != ws_list[0][0].shape):
            raise TypeError(
                f"{names[0]} and {name} must have one shape and format, got {ws_list[0][0].shape} "
                f"{'fp8' if wf.fp8 else 'bfloat16'} and {wd.shape} {'fp8' if fmt.fp8 else 'bfloat16'}"
            )
        wf = fmt
        n = _check_shapes(xd, xs, xf, name, wd, wsc, wf, counts, w_nk)
        ws_list.append((wd, wsc))
    _check_addressable(implementation, [("x", xd)] + [(name, d) for name, (d, _) in zip(names, ws_list, strict=True)])
    spec = _Spec(xf=xf, wf=wf, gated=gated, w_nk=w_nk, out_dtype=jnp.dtype(out_dtype))
    _resolve_config(config, spec, *xd.shape, n)  # the tiles' errors at trace time, before the per-platform split
    if not (xf.fp8 or wf.fp8):
        return _product_bf16(spec, config, implementation, counts, xd, tuple(d for d, _ in ws_list))
    return _product_fp8(spec, config, implementation, counts, xd, xs, ws_list)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def grouped_matmul(
    x: jax.Array | Fp8Array,
    w: jax.Array | Fp8Array,
    counts: jax.Array,
    *,
    out_dtype=jnp.bfloat16,
    w_layout: WLayout = "kn",
    implementation: Implementation = "auto",
    config: GroupedMatmulConfig | None = None,
) -> jax.Array:
    """Per-expert matmul over the valid rows of the dispatch layout.

    Args:
      x: ``[E_l, M, K]`` bfloat16, or the ``Fp8Array`` fp8 dispatch returns (``data`` float8_e4m3fn, ``scale``
        ``[E_l, M, K/128]`` float32 or float8_e8m0fnu). Rows at or past ``counts[e]`` are never read.
      w: ``[E_l, K, N]`` (``w_layout="kn"``) or ``[E_l, N, K]`` (``"nk"``) bfloat16, or an ``Fp8Array`` of
        float8_e4m3fn data in that layout with one scale per 128x128 block (``[E_l, K/128, N/128]``, or
        ``[E_l, N/128, K/128]`` for ``"nk"``; float32 or float8_e8m0fnu).
      counts: ``[E_l]`` int32, the valid rows of each expert (dispatch's ``recv_count``), each in ``[0, M]``
        (a value outside is clamped to it: nothing past the layout is ever read or written).
      out_dtype: ``bfloat16`` (default) or ``float32``.
      w_layout: ``"kn"`` or ``"nk"`` (see ``w``); fp8 weights are fastest as ``"nk"``.
      implementation: ``"auto"`` (the kernel on GPUs, the masked-einsum reference elsewhere), ``"pallas"`` (the
        kernel everywhere; interpreted, slowly, off GPUs), or ``"reference"``.
      config: tiles (:class:`GroupedMatmulConfig`); the defaults suit decode.

    Returns:
      ``[E_l, M, N]``: row ``m`` of expert ``e`` is ``x[e, m] @ w[e]`` accumulated in float32, for
      ``m < counts[e]``. Rows at or past ``counts[e]`` are unspecified (the kernel does not write them; the
      reference writes zeros). ``combine`` never reads them.

    Works under ``jax.jit``, ``jax.shard_map`` and ``lax.scan``; ``jax.grad`` to ``x`` and ``w`` for bfloat16
    operands (fp8 operands raise ``NotImplementedError`` if differentiated).

    Limit: the kernel (``"auto"``, ``"pallas"``) refuses an fp8 ``x`` or ``w`` of more than 2^31 elements and at
    most 2^32 (e.g. fp8 weights of more than 146 DeepSeek-V3 experts in one array) with a ``ValueError``: jax's
    Triton lowering addresses such arrays with wrapping 32-bit offsets. Split the expert axis across calls.
    """
    return _apply(
        x,
        [w],
        counts,
        names=("w",),
        gated=False,
        out_dtype=out_dtype,
        w_layout=w_layout,
        config=config,
        implementation=implementation,
    )


def swiglu(
    x: jax.Array | Fp8Array,
    w_gate: jax.Array | Fp8Array,
    w_up: jax.Array | Fp8Array,
    counts: jax.Array,
    *,
    w_layout: WLayout = "kn",
    implementation: Implementation = "auto",
    config: GroupedMatmulConfig | None = None,
) -> jax.Array:
    """``silu(x @ w_gate) * (x @ w_up)`` per expert over the valid rows, in one kernel: the activation runs on the
    float32 accumulators, and nothing of capacity size is written in between. Arguments as in
    :func:`grouped_matmul`; ``w_gate`` and ``w_up`` have one shape and format (``[E_l, H, F]``, or ``[E_l, F, H]``
    for ``"nk"``). Returns ``[E_l, M, F]`` bfloat16 with rows at or past ``counts[e]`` unspecified."""
    return _apply(
        x,
        [w_gate, w_up],
        counts,
        names=("w_gate", "w_up"),
        gated=True,
        out_dtype=jnp.bfloat16,
        w_layout=w_layout,
        config=config,
        implementation=implementation,
    )


def swiglu_mlp(
    x: jax.Array | Fp8Array,
    counts: jax.Array,
    w_gate: jax.Array | Fp8Array,
    w_up: jax.Array | Fp8Array,
    w_down: jax.Array | Fp8Array,
    *,
    w_layout: WLayout = "kn",
    implementation: Implementation = "auto",
) -> jax.Array:
    """The SwiGLU expert MLP on the dispatch layout: ``(silu(x @ w_gate) * (x @ w_up)) @ w_down`` per expert.

    ``x`` is dispatch's ``recv_x`` (bfloat16 or fp8) and ``counts`` its ``recv_count``. With ``w_layout="kn"``
    ``w_gate``/``w_up`` are ``[E_l, H, F]`` and ``w_down`` ``[E_l, F, H]``; with ``"nk"`` each is transposed (the
    PyTorch/DeepSeek-V3 checkpoint layout). bfloat16, or fp8 with 128x128 block scales. Returns ``[E_l, M, H]``
    bfloat16, ready for ``combine`` (rows at or past the count unspecified; combine never reads them). Two kernel
    launches; at decode every weight is read once.
    """
    h = swiglu(x, w_gate, w_up, counts, w_layout=w_layout, implementation=implementation)
    return grouped_matmul(h, w_down, counts, w_layout=w_layout, implementation=implementation)


def weights_nbytes(*weights) -> int:
    """Bytes of expert weights (data and scales): what one decode step must read at least once."""
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(weights))
