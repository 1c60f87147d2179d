"""Analytic multiply-accumulate counts of dense and factorised convs, for planning.

These are exact for conv layers (``n * c * kh * kw`` MACs per output pixel) and are what the rank
solver optimises. Reports to users use the frameworks' own counters instead.
"""
from __future__ import annotations

from typing import Sequence, Tuple

__all__: list = []  # internal: the planner's analytic MAC counts


def _hw(out_hw: Sequence[int]) -> int:
    h, w = out_hw
    return int(h) * int(w)


def full_rank(shape: Sequence[int]) -> int:
    """The largest rank of a conv weight ``(n, c, kh, kw)`` as an ``n x (c kh kw)`` matrix."""
    n, c, kh, kw = shape
    return min(n, c * kh * kw)


def conv_macs(shape: Tuple[int, int, int, int], out_hw: Sequence[int]) -> int:
    """MACs of a dense conv with weight ``shape = (n, c, kh, kw)`` producing ``out_hw`` pixels."""
    n, c, kh, kw = shape
    return n * c * kh * kw * _hw(out_hw)


def factorized_macs(shape: Tuple[int, int, int, int], rank: int, out_hw: Sequence[int]) -> int:
    """MACs of the factorised pair: ``kh x kw`` conv ``c -> k`` then ``1 x 1`` conv ``k -> n``."""
    n, c, kh, kw = shape
    return rank * (c * kh * kw + n) * _hw(out_hw)


def factorization_saves(shape: Tuple[int, int, int, int], rank: int) -> bool:
    """True when ``k (d + n) < n d``: two thin convs are cheaper than the rank-k dense conv."""
    n, c, kh, kw = shape
    d = c * kh * kw
    return rank * (d + n) < n * d
