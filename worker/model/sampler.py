"""Batched sampling on the model's device: one set of tensor operations for the whole batch.

Order: penalties on the raw logits, then temperature, min-p, top-k and top-p, then one draw
per row. Greedy rows take the argmax of the penalised logits. Random draws use the
exponential race (argmax of p / q with q ~ Exp(1)), which equals sampling from p; rows with
a seed draw their q from their own generator, so a seeded request gives the same tokens in
any batch. Log-probabilities are those of the model's raw distribution.
"""

from dataclasses import dataclass

import torch


@dataclass
class SamplingMetadata:
    temperature: torch.Tensor | None     # [B], None when every row is greedy
    greedy: torch.Tensor | None          # [B] bool
    top_k: torch.Tensor | None           # [B] long, V where off
    top_p: torch.Tensor | None           # [B]
    min_p: torch.Tensor | None           # [B]
    repetition: torch.Tensor | None      # [B]
    presence: torch.Tensor | None        # [B]
    frequency: torch.Tensor | None       # [B]
    prompt_mask: torch.Tensor | None     # [B, V] bool: token occurs in the prompt
    output_counts: torch.Tensor | None   # [B, V]: occurrences in the output so far
    generators: dict[int, torch.Generator]
    num_logprobs: list[int | None]


# a sampled token's logprob and the top k: (logprob, [(token id, logprob), ...])
TokenLogprob = tuple[float, list[tuple[int, float]]]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]  # per row, None where not asked


def apply_penalties(logits: torch.Tensor, m: SamplingMetadata) -> torch.Tensor:
    if m.output_counts is None:
        return logits
    # set together with output_counts (runner.sampling_metadata), prompt_mask with repetition
    assert m.presence is not None and m.frequency is not None
    if m.repetition is not None:
        assert m.prompt_mask is not None
        seen = m.prompt_mask | (m.output_counts > 0)
        rep = m.repetition[:, None].expand_as(logits)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    return (logits - m.frequency[:, None] * m.output_counts
            - m.presence[:, None] * (m.output_counts > 0).float())


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(min=0)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1 - top_p)[:, None]
        drop[:, -1] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(sorted_logits).scatter_(1, order, sorted_logits)


def sample(logits: torch.Tensor, m: SamplingMetadata) -> SamplerOutput:
    """logits: [B, V] float32."""
    raw = logits
    logits = apply_penalties(logits, m)
    if m.temperature is None:
        tokens = logits.argmax(dim=-1)
    else:
        greedy_tokens = logits.argmax(dim=-1)
        x = logits / m.temperature[:, None]
        if m.min_p is not None:
            probs = x.softmax(dim=-1)
            cutoff = m.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            x = x.masked_fill(probs < cutoff, float("-inf"))
        if m.top_k is not None or m.top_p is not None:
            x = apply_top_k_top_p(x, m.top_k, m.top_p)
        probs = x.softmax(dim=-1)
        q = torch.empty_like(probs).exponential_()
        for row, gen in m.generators.items():
            q[row].exponential_(generator=gen)
        random_tokens = (probs / q).argmax(dim=-1)
        assert m.greedy is not None  # set together with temperature
        tokens = torch.where(m.greedy, greedy_tokens, random_tokens)
    token_list = tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(token_list)
    asked = [(i, k) for i, k in enumerate(m.num_logprobs) if k is not None]
    if asked:
        rows = [i for i, _ in asked]
        lp = raw[rows].log_softmax(dim=-1)
        top_vals, top_ids = lp.topk(max(1, max(k for _, k in asked)), dim=-1)
        chosen = lp.gather(1, tokens[rows][:, None]).squeeze(1).tolist()
        vals, ids = top_vals.tolist(), top_ids.tolist()
        for j, (i, n) in enumerate(asked):
            logprobs[i] = (chosen[j], list(zip(ids[j][:n], vals[j][:n])))
    return SamplerOutput(token_list, logprobs)
