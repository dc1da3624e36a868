"""Turns a scheduled batch into tensors, runs the model over the paged cache, samples."""

import torch

from .attention import AttentionMetadata
from .config import EngineConfig
from .llama import ModelConfig, load_model
from .sampler import SamplerOutput, SamplingMetadata, sample
from .scheduler import ScheduledBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        self.config = config
        self.model_config = model_config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        self.model = load_model(config.model, self.dtype, self.device)
        self.num_blocks = config.num_blocks or self._blocks_from_budget(config.kv_cache_bytes)
        mc = model_config
        slots = self.num_blocks * self.block_size
        # zeros, not garbage: padded reads of slot 0 are masked, but NaN * 0 would still be NaN
        self.kv_caches = [torch.zeros(2, slots, mc.num_key_value_heads, mc.head_dim,
                                      dtype=self.dtype, device=self.device)
                          for _ in range(mc.num_hidden_layers)]

    @property
    def bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.finfo(self.dtype).bits // 8
        return 2 * mc.num_hidden_layers * self.block_size * mc.num_key_value_heads * mc.head_dim * elem

    def _blocks_from_budget(self, budget: int) -> int:
        n = budget // self.bytes_per_block
        if n < 1:
            raise ValueError(f"kv_cache_bytes={budget} holds no block of {self.bytes_per_block} bytes")
        return int(n)

    def prepare(self, batch: ScheduledBatch):
        bs = self.block_size
        seqs, counts = batch.seqs, batch.num_new_tokens
        B = len(seqs)
        starts = [s.num_computed_tokens for s in seqs]
        input_ids: list[int] = []
        for s, start, n in zip(seqs, starts, counts):
            input_ids.extend(s.token_ids[start:start + n])
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = torch.zeros(B, max_blocks, dtype=torch.long)
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.long)

        start_t = torch.tensor(starts, dtype=torch.long)
        n_t = torch.tensor(counts, dtype=torch.long)
        ctx_t = start_t + n_t
        cu = torch.zeros(B + 1, dtype=torch.long)
        torch.cumsum(n_t, 0, out=cu[1:])
        T = int(cu[-1])
        seq_idx = torch.repeat_interleave(torch.arange(B), n_t)
        positions = start_t[seq_idx] + torch.arange(T) - cu[:-1][seq_idx]
        slot_mapping = tables[seq_idx, positions // bs] * bs + positions % bs

        sample_rows = [i for i, s in enumerate(seqs) if starts[i] + counts[i] >= s.num_tokens]
        logits_indices = cu[1:][sample_rows] - 1

        meta = AttentionMetadata(slot_mapping=slot_mapping)
        if B == 1 and starts[0] == 0:
            meta.prefill_fresh = True
        else:
            decode = (n_t == 1).nonzero().squeeze(1)
            prefill = (n_t > 1).nonzero().squeeze(1)
            if len(decode):
                ld = int(ctx_t[decode].max())
                meta.decode_tokens = cu[:-1][decode]
                meta.decode_slots = self._context_slots(tables[decode], ld)
                meta.decode_mask = (torch.arange(ld)[None, :] < ctx_t[decode][:, None])[:, None, None, :]
            if len(prefill):
                qp = int(n_t[prefill].max())
                lp = int(ctx_t[prefill].max())
                q_off = torch.arange(qp)
                valid = q_off[None, :] < n_t[prefill][:, None]
                meta.prefill_tokens = torch.where(valid, cu[:-1][prefill][:, None] + q_off[None, :], 0)
                meta.prefill_valid = valid
                meta.prefill_slots = self._context_slots(tables[prefill], lp)
                q_pos = start_t[prefill][:, None] + q_off[None, :]
                meta.prefill_mask = (torch.arange(lp)[None, None, :] <= q_pos[:, :, None])[:, None]
        dev = self.device
        for name in ("slot_mapping", "decode_tokens", "decode_slots", "decode_mask",
                     "prefill_tokens", "prefill_valid", "prefill_slots", "prefill_mask"):
            value = getattr(meta, name)
            if value is not None and value.device != dev:
                setattr(meta, name, value.to(dev, non_blocking=True))
        ids = torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True)
        return ids, positions.to(dev, non_blocking=True), meta, logits_indices.to(dev), sample_rows

    def _context_slots(self, tables: torch.Tensor, length: int) -> torch.Tensor:
        bs = self.block_size
        nb = (length + bs - 1) // bs
        slots = tables[:, :nb, None] * bs + torch.arange(bs)[None, None, :]
        return slots.reshape(tables.shape[0], -1)[:, :length]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[int], SamplerOutput | None]:
        """Returns the rows of `batch` that produced a token, and the tokens."""
        ids, positions, meta, logits_indices, rows = self.prepare(batch)
        logits = self.model(ids, positions, self.kv_caches, meta, logits_indices)
        if not rows:
            return rows, None
        seqs = [batch.seqs[i] for i in rows]
        sampling = SamplingMetadata.build(seqs, self.model_config.vocab_size, self.device)
        return rows, sample(logits, sampling)
