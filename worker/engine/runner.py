"""Turns a scheduled batch into tensors, runs the model over the paged cache, samples."""

import torch

from ..model.attention import AttentionMetadata, DecodeGroup, PrefillChunk
from ..model.llama import DTYPES, ModelConfig, load_model
from ..model.sampler import SamplerOutput, SamplingMetadata, sample
from .config import EngineConfig
from .device_clock import DeviceClock
from .kv_hooks import LayerDone
from .phases import PhaseClock
from .scheduler import ScheduledBatch
from .sequence import Sequence


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
        self.clock: PhaseClock | None = None  # phases.attach: time preparation, forward, sampling

    def device_clock(self) -> DeviceClock:
        """What times this runner's forward passes on its device (device_clock.py)."""
        return DeviceClock(self.device)

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

        dev = self.device
        meta = AttentionMetadata(slot_mapping=slot_mapping.to(dev, non_blocking=True))
        ctx, cu_list = ctx_t.tolist(), cu.tolist()
        decodes = sorted((i for i in range(B) if counts[i] == 1), key=ctx.__getitem__)
        for group in _length_groups(decodes, ctx):
            lengths = [ctx[i] for i in group]
            longest = lengths[-1]
            slots = self._context_slots(tables[group], longest)
            mask = None
            if lengths[0] != longest:
                mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
                mask = mask.to(dev, non_blocking=True)
            meta.decode.append(DecodeGroup(torch.tensor([cu_list[i] for i in group]).to(dev, non_blocking=True),
                                           slots.to(dev, non_blocking=True), mask))
        for i in range(B):
            if counts[i] == 1:
                continue
            chunk = PrefillChunk(cu_list[i], cu_list[i + 1])
            if starts[i] > 0:
                chunk.slots = self._context_slots(tables[i:i + 1], ctx[i])[0].to(dev, non_blocking=True)
                q_pos = torch.arange(starts[i], ctx[i])
                chunk.mask = (torch.arange(ctx[i])[None, :] <= q_pos[:, None]).to(dev, non_blocking=True)
            meta.prefill.append(chunk)
        ids = torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True)
        return ids, positions.to(dev, non_blocking=True), meta, logits_indices.to(dev), sample_rows

    def _context_slots(self, tables: torch.Tensor, length: int) -> torch.Tensor:
        bs = self.block_size
        nb = (length + bs - 1) // bs
        slots = tables[:, :nb, None] * bs + torch.arange(bs)[None, None, :]
        return slots.reshape(tables.shape[0], -1)[:, :length]

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, layer_done: LayerDone | None = None
            ) -> tuple[list[int], SamplerOutput | None]:
        """Returns the rows of `batch` that produced a token, and the tokens. `layer_done`
        is called with each layer's index once its keys and values are written (queued, on
        a GPU) into the cache."""
        clock = self.clock
        if clock is not None:
            clock.start()
        ids, positions, meta, logits_indices, rows = self.prepare(batch)
        if clock is not None:
            clock.lap("prepare")
        logits = self.model(ids, positions, self.kv_caches, meta, logits_indices, layer_done)
        if clock is not None:
            clock.lap("forward")
        if not rows:
            return rows, None
        seqs = [batch.seqs[i] for i in rows]
        sampling = sampling_metadata(seqs, self.model_config.vocab_size, self.device)
        out = sample(logits, sampling)
        if clock is not None:
            clock.lap("sample")
        return rows, out


def _length_groups(rows: list[int], ctx: list[int], spread: float = 1.15, max_groups: int = 16) -> list[list[int]]:
    """Rows sorted by context length, cut into groups whose longest context is at most
    `spread` times their shortest (padding waste under 15%), at most `max_groups` of them."""
    if not rows:
        return []
    groups: list[list[int]] = []
    current = [rows[0]]
    for r in rows[1:]:
        if ctx[r] > spread * ctx[current[0]] and len(groups) < max_groups - 1:
            groups.append(current)
            current = [r]
        else:
            current.append(r)
    groups.append(current)
    return groups


def sampling_metadata(seqs: list[Sequence], vocab_size: int, device: torch.device) -> SamplingMetadata:
    """The batch's sampling settings as tensors on the model's device; rows with a seed
    carry their sequence's own generator."""
    ps = [s.params for s in seqs]
    B = len(seqs)

    def col(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=device)

    all_greedy = all(p.greedy for p in ps)
    meta = SamplingMetadata(None, None, None, None, None, None, None, None, None, None, {},
                            [p.logprobs for p in ps])
    if not all_greedy:
        meta.greedy = col([p.greedy for p in ps], torch.bool)
        meta.temperature = col([p.temperature if not p.greedy else 1.0 for p in ps])
        if any(p.top_k > 0 for p in ps):
            meta.top_k = col([p.top_k if p.top_k > 0 else vocab_size for p in ps], torch.long)
        if any(p.top_p < 1.0 for p in ps):
            meta.top_p = col([p.top_p for p in ps])
        if any(p.min_p > 0 for p in ps):
            meta.min_p = col([p.min_p for p in ps])
        for i, s in enumerate(seqs):
            if s.params.seed is not None and not s.params.greedy:
                meta.generators[i] = s.generator(device, vocab_size)
    need_rep = any(p.repetition_penalty != 1.0 for p in ps)
    need_freq = any(p.presence_penalty or p.frequency_penalty for p in ps)
    if need_rep or need_freq:
        outputs = [s.output_token_ids for s in seqs]
        width = max(1, max(len(o) for o in outputs))
        padded = torch.full((B, width), vocab_size, dtype=torch.long)
        for i, o in enumerate(outputs):
            padded[i, :len(o)] = torch.tensor(o, dtype=torch.long)
        counts = torch.zeros(B, vocab_size + 1, dtype=torch.float32)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
        meta.output_counts = counts[:, :vocab_size].to(device)
        meta.presence = col([p.presence_penalty for p in ps])
        meta.frequency = col([p.frequency_penalty for p in ps])
        if need_rep:
            meta.repetition = col([p.repetition_penalty for p in ps])
            mask = torch.zeros(B, vocab_size + 1, dtype=torch.bool)
            for i, s in enumerate(seqs):
                mask[i, s.token_ids[:s.num_prompt_tokens]] = True
            meta.prompt_mask = mask[:, :vocab_size].to(device)
    return meta
