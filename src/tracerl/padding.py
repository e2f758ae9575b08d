"""Right padding, the one way tracerl batches token sequences for a causal forward.

A causal model needs no attention mask for right-padded rows: a real token never attends to a later
position, so every row's real tokens get exactly the values they would get alone (and the fused causal
kernel runs). Generation pads on the left instead (backends/hf.py), so every row's next token is last.
"""

from __future__ import annotations

from typing import Sequence

import torch


def right_pad(rows: Sequence[Sequence[float]], value: float = 0, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """(B, L) tensor of `rows`, each followed by `value` up to the longest row's length L."""
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out
