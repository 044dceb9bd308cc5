"""The rotary permutation between Meta's interleaved and HF/vLLM's half-split rotary layouts.

Where rotary embedding pairs sit inside a head of ``wq``/``wk`` differs:

* **interleaved** (Meta): Meta applies RoPE with complex numbers, ``view_as_complex(x.reshape(..., d/2, 2))``,
  so pair ``i`` of a head is rows ``(2i, 2i+1)``.
* **half-split** (HF/vLLM): ``rotate_half`` pairs row ``i`` with row ``i + d/2``.

The same attention therefore needs each head's rows reordered, which HF's
``convert_llama_weights_to_hf.py`` does as ``w.view(n_heads, d / n_heads / 2, 2, in).transpose(1, 2)``.
Only the order of q and k rows within a head changes, and identically for both, so ``q . k`` (and the
attention scores) are unchanged; the tests prove it against both RoPE implementations.
"""

from __future__ import annotations

import torch

from ipcbridge.errors import MappingError


def _head_view(w: torch.Tensor, n_heads: int, name: str) -> tuple[int, int]:
    rows = w.shape[0] if w.dim() else 0
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise MappingError(
            f"{name}: {rows} rows cannot be split into {n_heads} heads of an even head_dim, which the rotary "
            "permutation needs; check num_attention_heads / num_key_value_heads / head_dim in the config"
        )
    return n_heads, rows // n_heads


def permute_rotary(w: torch.Tensor, n_heads: int, name: str = "tensor") -> torch.Tensor:
    """Meta's interleaved rotary rows -> HF/vLLM's half-split rows, per head (a new tensor).

    Row ``2i + j`` of a head (pair ``i``, real ``j=0`` / imaginary ``j=1``) moves to row ``j * d/2 + i``.
    Works for weights ``[n_heads * d, in]`` and biases ``[n_heads * d]``.
    """
    n, d = _head_view(w, n_heads, name)
    grouped = w.reshape(n, d // 2, 2, *w.shape[1:]).transpose(1, 2)
    return grouped.clone(memory_format=torch.contiguous_format).reshape(w.shape)


def unpermute_rotary(w: torch.Tensor, n_heads: int, name: str = "tensor") -> torch.Tensor:
    """HF/vLLM's half-split rotary rows -> Meta's interleaved rows, per head; the inverse of
    :func:`permute_rotary` (a new tensor)."""
    n, d = _head_view(w, n_heads, name)
    grouped = w.reshape(n, 2, d // 2, *w.shape[1:]).transpose(1, 2)
    return grouped.clone(memory_format=torch.contiguous_format).reshape(w.shape)
