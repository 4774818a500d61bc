"""Routing and payload builders: random and skewed routing, weights, tokens (self-describing ones carry their
source), and poisoned rows past the valid counts."""

from __future__ import annotations

import ml_dtypes
import numpy as np

BF16 = ml_dtypes.bfloat16


def random_routing(
    rng: np.random.Generator, num_tokens: int, topk: int, num_experts: int, *, drop_prob: float = 0.0
) -> np.ndarray:
    """[n, K] int32 of distinct experts per token, uniformly at random; each entry becomes -1 ("no expert") with
    probability ``drop_prob``."""
    if topk > num_experts:
        raise ValueError(f"topk={topk} distinct experts need num_experts >= topk, got {num_experts}")
    keys = rng.random((num_tokens, num_experts))
    idx = np.argsort(keys, axis=1)[:, :topk].astype(np.int32)
    if drop_prob > 0:
        idx[rng.random(idx.shape) < drop_prob] = -1
    return idx


def skewed_routing(
    rng: np.random.Generator, num_tokens: int, topk: int, num_experts: int, *, expert: int = 0
) -> np.ndarray:
    """Every token chooses ``expert`` (at a random position k); its other choices are random distinct experts.
    With every rank doing this, ``expert`` receives R*n rows: the full capacity of its layout."""
    idx = random_routing(rng, num_tokens, topk, num_experts)
    for t in range(num_tokens):
        row = [e for e in idx[t] if e != expert][: topk - 1]
        row.insert(int(rng.integers(0, topk)), expert)
        idx[t] = row
    return idx


def random_weights(rng: np.random.Generator, topk_idx: np.ndarray, *, invalid: float = np.nan) -> np.ndarray:
    """[n, K] float32 softmax weights over each token's valid choices; entries of -1 choices get ``invalid``
    (NaN by default, so a combine that reads them cannot go unnoticed)."""
    logits = rng.standard_normal(topk_idx.shape).astype(np.float32)
    logits = np.where(topk_idx >= 0, logits, -np.inf)
    with np.errstate(invalid="ignore"):
        w = np.exp(logits - np.max(logits, axis=1, keepdims=True))
        w = w / np.sum(w, axis=1, keepdims=True)
    return np.where(topk_idx >= 0, w, np.float32(invalid)).astype(np.float32)


def random_tokens(rng: np.random.Generator, num_tokens: int, hidden: int) -> np.ndarray:
    """[n, H] bfloat16 random values whose magnitude varies across 128-channel blocks and tokens (over ~12 binades),
    so fp8 scales differ from block to block."""
    blocks = max(hidden // 128, 1)
    magnitude = np.exp2(rng.integers(-6, 7, size=(num_tokens, blocks))).astype(np.float32)
    magnitude = np.repeat(magnitude, 128, axis=1)[:, :hidden]
    return (rng.standard_normal((num_tokens, hidden)).astype(np.float32) * magnitude).astype(BF16)


SOURCE_CHANNELS = 3  # channels 0..2 of a self-describing row: rank, token % 128, token // 128 (exact in bf16)


def self_describing_tokens(rng: np.random.Generator, rank: int, num_tokens: int, hidden: int) -> np.ndarray:
    """Random bf16 tokens whose first channels encode (source rank, token index), so a receiver can tell where
    each row came from (see :func:`decode_source`). Ranks up to 256 and tokens up to 32768 are exact."""
    x = random_tokens(rng, num_tokens, hidden)
    t = np.arange(num_tokens)
    x[:, 0] = rank
    x[:, 1] = t % 128
    x[:, 2] = t // 128
    return x


def decode_source(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source rank, source token) of bf16 rows built by :func:`self_describing_tokens`."""
    f = np.asarray(rows[..., :SOURCE_CHANNELS]).astype(np.float32).astype(np.int64)
    return f[..., 0], f[..., 1] + 128 * f[..., 2]


def poison_invalid_rows(y: np.ndarray, recv_count: np.ndarray, value: float = np.nan) -> np.ndarray:
    """A copy of [E_l, R*T, ...] ``y`` whose rows past recv_count hold ``value`` (NaN: reading one shows)."""
    y = np.array(y, copy=True)
    for e, c in enumerate(np.asarray(recv_count)):
        y[e, int(c) :] = value
    return y
