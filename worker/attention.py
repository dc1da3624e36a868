"""Attention over the paged KV cache.

The cache of one layer is `[2, num_slots, num_kv_heads, head_dim]` with
`num_slots = num_blocks * block_size`; a token's slot is `block_table[pos // bs] * bs + pos % bs`.
New keys and values are written to their slots first, then every sequence attends to its
whole context read back through its block table. Sequences with one new token (decodes)
and sequences with several (prompt chunks) form two groups, each one batched call.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor                 # [T] cache slot of each new token
    decode_tokens: torch.Tensor | None = None  # [Bd] flat index of each decode's token
    decode_slots: torch.Tensor | None = None   # [Bd, Ld] context slots (padding reads slot 0)
    decode_mask: torch.Tensor | None = None    # [Bd, 1, 1, Ld] key visible
    prefill_tokens: torch.Tensor | None = None  # [Bp, Qp] flat token indices (padding: 0)
    prefill_valid: torch.Tensor | None = None   # [Bp, Qp] real query token
    prefill_slots: torch.Tensor | None = None   # [Bp, Lp] context slots
    prefill_mask: torch.Tensor | None = None    # [Bp, 1, Qp, Lp] causal and in-context
    prefill_fresh: bool = False  # one prompt and no earlier context: attend to the new k, v directly


def store_kv(k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)


def _sdpa(q, k, v, mask, scale, causal=False):
    # q [B, H, Q, D]; k, v [B, Hkv, L, D]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def paged_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D], k and v: [T, Hkv, D] (already stored) -> [T, H, D]."""
    if meta.prefill_fresh:
        out = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                    None, scale, causal=q.shape[0] > 1)
        return out[0].transpose(0, 1)
    out = torch.empty_like(q)
    if meta.decode_tokens is not None:
        qd = q[meta.decode_tokens].unsqueeze(2)
        k = k_cache[meta.decode_slots].transpose(1, 2)
        v = v_cache[meta.decode_slots].transpose(1, 2)
        out[meta.decode_tokens] = _sdpa(qd, k, v, meta.decode_mask, scale).squeeze(2)
    if meta.prefill_tokens is not None:
        qp = q[meta.prefill_tokens].transpose(1, 2)
        k = k_cache[meta.prefill_slots].transpose(1, 2)
        v = v_cache[meta.prefill_slots].transpose(1, 2)
        o = _sdpa(qp, k, v, meta.prefill_mask, scale).transpose(1, 2)
        out[meta.prefill_tokens[meta.prefill_valid]] = o[meta.prefill_valid]
    return out
