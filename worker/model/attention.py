"""Attention over the paged KV cache.

The cache of one layer is `[2, num_slots, num_kv_heads, head_dim]` with
`num_slots = num_blocks * block_size`; a token's slot is `block_table[pos // bs] * bs + pos % bs`.
New keys and values are written to their slots first, then every sequence attends to its
whole context read back through its block table.

Decodes (one new token each) are batched in groups of similar context length, so that
padding a group to its longest context wastes little; a group whose contexts are all the
same length needs no mask. A decode's query heads are laid out as
[kv head, queries per kv head], which turns grouped-query attention into plain attention
over the kv heads without repeating keys and values. Prompt chunks (several new tokens)
attend one sequence at a time: causal over the new keys for a fresh prompt, through the
cache with an offset causal mask for a later chunk.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class DecodeGroup:
    tokens: torch.Tensor              # [b] flat index of each decode's token
    slots: torch.Tensor               # [b, L] context slots (padding reads slot 0)
    mask: torch.Tensor | None = None  # [b, 1, 1, L] key visible; None: no padding


@dataclass
class PrefillChunk:
    lo: int                           # the chunk's tokens are lo .. hi - 1 of the batch
    hi: int
    slots: torch.Tensor | None = None  # [L] context slots; None: a fresh prompt, attend to the new keys
    mask: torch.Tensor | None = None   # [Q, L] causal with the chunk's offset


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor        # [T] cache slot of each new token
    decode: list[DecodeGroup] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)


def store_kv(k, v, k_cache, v_cache, meta: AttentionMetadata) -> None:
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)


def paged_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D], k and v: [T, Hkv, D] (already stored) -> [T, H, D]."""
    num_heads, num_kv, dim = q.shape[1], k.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for g in meta.decode:
        b = g.tokens.shape[0]
        qd = q[g.tokens].view(b, num_kv, num_heads // num_kv, dim)
        kd = k_cache[g.slots].transpose(1, 2)
        vd = v_cache[g.slots].transpose(1, 2)
        attended = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=g.mask, scale=scale)
        out[g.tokens] = attended.view(b, num_heads, dim)
    gqa = num_heads != num_kv
    for p in meta.prefill:
        qp = q[p.lo:p.hi].transpose(0, 1)[None]
        if p.slots is None:
            kp, vp = k[p.lo:p.hi].transpose(0, 1)[None], v[p.lo:p.hi].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=p.hi - p.lo > 1, scale=scale, enable_gqa=gqa)
        else:
            kp, vp = k_cache[p.slots].transpose(0, 1)[None], v_cache[p.slots].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale, enable_gqa=gqa)
        out[p.lo:p.hi] = o[0].transpose(0, 1)
    return out
