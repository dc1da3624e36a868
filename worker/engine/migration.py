"""A running request moved between workers with its KV, not recomputed (a drain's live
migration, as Llumnix does it).

On the worker it leaves (`export_running`), each decoding choice gives its blocks to a
context sequence (the prompt and the output but the last token: what the cache holds),
which the KV connector keeps under a lease like a finished prefill, and the choice ends
with the reason `migrated`, so that its stream says where it went and closes. On the
worker it moves to (`add_moved`), the choices start as a resumed request would (the
output kept as output, the seeded sampler moved past its draws) but wait, RESERVED, with
blocks for that context; once the keys and values are in, `activate_moved` lets them
decode on. A choice whose keys and values did not arrive is recomputed instead.
"""

from .engine import LLMEngine, RequestError, RequestOutput
from .sequence import SamplingParams, Sequence, SequenceStatus

MIGRATED = "migrated"  # the finish reason of a choice whose KV left this worker


def handle_of(request_id: str, index: int) -> str:
    """The KV lease's name for one moved choice."""
    return f"{request_id}.m{index}"


def export_running(engine: LLMEngine, request_ids: list[str]) -> tuple[list[Sequence], list[RequestOutput]]:
    """Takes the unfinished choices of `request_ids` out of the batch: (their context
    sequences, which hold their blocks now, named by `handle_of`; the `migrated` outputs
    that end their streams). All or nothing: a RequestError when a request is unknown or
    one of its choices is not decoding (waiting, preempted, or its prompt still in
    chunks), since only a decoding choice has all its context in blocks."""
    seqs = []
    for rid in request_ids:
        if rid not in engine.requests:
            raise RequestError(f"request_ids: no request {rid!r} is running here", "request_ids")
        seqs += [s for s in engine.requests[rid] if not s.is_finished]
    for s in seqs:
        if s.status != SequenceStatus.RUNNING or s.num_computed_tokens != s.num_tokens - 1:
            raise RequestError(f"request_ids: {s.request_id!r} is not decoding (its choice {s.index} waits "
                               "or is still computing its prompt)", "request_ids")
    contexts, outs = [], []
    for s in seqs:
        ctx = Sequence(s.token_ids[:-1], s.params, handle_of(s.request_id, s.index), s.index)
        ctx.block_table, ctx.block_hashes, s.block_table, s.block_hashes = s.block_table, s.block_hashes, [], []
        ctx.num_computed_tokens = ctx.num_tokens
        ctx.status = SequenceStatus.FINISHED
        contexts.append(ctx)
        outs.append(engine._finish(s, MIGRATED))
    return contexts, outs


def add_resumed(engine: LLMEngine, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                choices: list[tuple[int, list[int], int]]) -> dict[int, int]:
    """Continues the choices (index, output token ids so far, random draws made) of a
    request another worker was generating. The outputs are kept as output, replayed
    through the same text and stop logic, so penalties, held-back stop text and counts
    come out as without the move; the prompt and outputs are recomputed here. Returns
    each choice's characters of text already sent."""
    if not choices:
        raise RequestError("choices: nothing to continue", "choices")
    seqs = engine._new_request(request_id, prompt_token_ids, params)
    by_index = {seq.index: seq for seq in seqs}
    kept, sent = [], {}
    for index, outputs, draws in choices:
        seq = by_index.get(index)
        if seq is None or seq in kept:
            raise RequestError(f"choices: index {index} is not a choice of this request (n={params.n})", "choices")
        for j, token in enumerate(outputs):
            seq.append_token(token)
            _, reason = engine._text_step(seq, token)
            if reason is not None:
                raise RequestError(f"choices[{index}].output_token_ids: the output ends ({reason}) at "
                                   f"token {j}, before the last", "choices")
        seq.skip_draws = draws
        kept.append(seq)
        sent[index] = engine._text[seq.seq_id].emitted
    for seq in seqs:
        if seq not in kept:
            engine._text.pop(seq.seq_id, None)
    kept[0].parent = None
    for seq in kept[1:]:
        seq.parent = kept[0]
    for seq in kept:
        engine.scheduler.add(seq)
    engine.requests[request_id] = kept
    return sent


def add_moved(engine: LLMEngine, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
              choices: list[tuple[int, list[int], int]]
              ) -> tuple[dict[int, int], dict[int, Sequence | None], dict[int, int]]:
    """Takes the choices (index, output so far, draws made) of a request whose KV is on its
    way, as `add_resumed` would, and sets blocks aside for each one's context,
    reusing what the prefix cache holds. The first choice that gets blocks leads: the
    others share its blocks of their common prompt (its full blocks), so the prompt is
    pulled once, not once per choice. Returns each choice's characters of text already
    sent; its sequence (its keys and values due from `num_computed_tokens` up to its last
    token), or None when there are no blocks to spare (it is recomputed then); and, for a
    choice that shares the leader's blocks, the leader's index (its keys and values are
    whole only once the leader's have arrived too)."""
    sent = add_resumed(engine, request_id, prompt_token_ids, params, choices)
    bm, scheduler = engine.block_manager, engine.scheduler
    reserved: dict[int, Sequence | None] = {}
    follows: dict[int, int] = {}
    lead: Sequence | None = None
    common = len(prompt_token_ids) // bm.block_size  # full blocks of the prompt: alike in every choice
    for seq in engine.requests[request_id]:
        scheduler.waiting.remove(seq)
        seq.status = SequenceStatus.RESERVED
        computed = bm.get_computed_blocks(seq)
        context = seq.num_tokens - 1
        if (lead is not None and common > len(computed) and len(lead.block_table) >= common
                and context >= common * bm.block_size):
            shared = lead.block_table[:common]
            if bm.can_allocate(seq, context - common * bm.block_size, shared, scheduler.watermark):
                bm.share(seq, shared, context - common * bm.block_size)
                reserved[seq.index], follows[seq.index] = seq, lead.index
                continue
        num_new = context - len(computed) * bm.block_size
        if bm.can_allocate(seq, num_new, computed, scheduler.watermark):
            bm.allocate(seq, num_new, computed)
            reserved[seq.index] = seq
            lead = lead or seq
        else:
            reserved[seq.index] = None
    return sent, reserved, follows


def activate_moved(engine: LLMEngine, request_id: str, received: dict[int, bool]) -> None:
    """Each reserved choice decodes on from its context (`received[index]`) or queues to
    be recomputed from its tokens."""
    for seq in engine.requests.get(request_id, []):
        if seq.status != SequenceStatus.RESERVED:
            continue  # aborted meanwhile
        engine.scheduler.activate(seq, seq.num_tokens - 1 if received.get(seq.index) else None)
