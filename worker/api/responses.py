"""OpenAI response bodies and server-sent events of one served model: choices, usage,
logprobs, and an error after a stream started sent as an error event."""

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from fleetwise.protocol import COALESCED_IDS_EVERY_S

from ..engine.async_engine import EngineDead
from ..engine.engine import RequestOutput
from ..engine.migration import MIGRATED
from ..model.sampler import TokenLogprob
from ..model.tokenizer import Tokenizer
from .openai import APIError, error_body

Outputs = AsyncGenerator[tuple[int, RequestOutput], None]  # (prompt index, output) as they come
Chunk = dict | None  # one event's body; None: nothing to send for this output
Trace = Callable[[int, RequestOutput], dict]  # an event's `fw:` line's fields (fleetwise/protocol.py)


@dataclass
class Resumed:
    """A stream that goes on from another worker's: per choice key, the characters of text
    already sent (completion logprobs' offsets go on from there), the output counts of the
    choices already finished, and the choices already begun (chat sent their role)."""
    sent: dict[int, int] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    started: set[int] = field(default_factory=set)


def tracer(prompts: list[list[int]], rid: str, created: int, n: int, texts: bool = False) -> Trace:
    """The `fw:` lines' fields of a stream: each output's token ids; the first of each prompt
    also the prompt's and the engine's id of its request, the very first the response's id.
    `texts`: each line also carries its output's text (a coalesced stream)."""
    seen: set[int] = set()

    def line(i: int, out: RequestOutput) -> dict:
        d: dict = {"index": i * n + out.index, "token_ids": out.token_ids,
                   "finish_reason": out.finish_reason if out.finished else None}
        if texts:
            d["text"] = out.text
        if i not in seen:
            if not seen:
                d.update(id=rid, created=created)
            seen.add(i)
            d.update(prompt=i, prompt_token_ids=prompts[i], request_id=out.request_id)
        return d
    return line


def fw(line: dict) -> str:
    return f"fw: {json.dumps(line)}\n"


class HeldIds:
    """A coalesced stream's `fw:` lines, held back and sent merged, one per choice
    (fleetwise/protocol.py): the client sees nothing of the stream before its end, so a line
    per output token would only wake the router once per token. A prompt's first line goes
    at once (the router then knows the prompt, and a drain may move the stream); the others
    at most every `every` seconds, and all that is held before the stream's last events."""

    def __init__(self, every: float = COALESCED_IDS_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.every, self.clock = every, clock
        self.lines: dict[int, dict] = {}
        self.sent_at = clock()

    def add(self, line: dict) -> str:
        """The lines to send now ("" while they wait)."""
        held = self.lines.get(line["index"])
        if held is None:
            self.lines[line["index"]] = {**line, "token_ids": list(line["token_ids"])}
        else:
            held["token_ids"] += line["token_ids"]
            held["finish_reason"] = line["finish_reason"]
            held["text"] = held.get("text", "") + line.get("text", "")
        if "prompt_token_ids" in line or self.clock() - self.sent_at >= self.every:
            return self.flush()
        return ""

    def flush(self) -> str:
        """Every held line, each an event of its own."""
        self.sent_at = self.clock()
        lines, self.lines = self.lines, {}
        return "".join(fw(d) + "\n" for d in lines.values())


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompts: list[list[int]], outs: dict, cached: int) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(outs.values())
    # a resumed request recomputes its output too, which the prefix cache may hold: only the prompt's count
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": min(cached, prompt_tokens)}}


async def events(stream: Outputs, make_chunk: Callable[[int, RequestOutput], Chunk],
                 usage_chunk: Callable[[], dict] | None, trace: Trace | None = None,
                 merged: "Merged | None" = None) -> AsyncIterator[str]:
    """Server-sent events; an error after the stream started is sent as an error event.
    With `trace`, every output gets an event, led by its `fw:` line. With `merged` (a
    coalesced stream, fleetwise/protocol.py) the `fw:` lines are the events, held back and
    merged (`HeldIds`), and the chunks go out as one event at the end. A stream whose choices
    were exported (a drain's live migration) ends with an error event of code `migrated`,
    after every id sampled before it."""
    moved = False
    held = HeldIds() if merged is not None and trace is not None else None
    try:
        async for item in stream:
            if item[1].finish_reason == MIGRATED:  # its KV left for another worker: not an end
                moved = True
                continue
            chunk = make_chunk(*item)
            if held is not None and trace is not None and merged is not None:
                if chunk is not None:
                    merged.add(chunk)
                if lines := held.add(trace(*item)):
                    yield lines
            elif trace is not None:
                yield fw(trace(*item)) + (sse(chunk) if chunk is not None else "\n")
            elif chunk is not None:
                yield sse(chunk)
        if held is not None and held.lines:
            yield held.flush()
        if moved:
            yield sse(error_body("the stream moved to another worker", "server_error", None, MIGRATED))
        else:
            if merged is not None and merged.first is not None:
                yield sse(merged.chunk())
            if usage_chunk is not None:
                yield sse(usage_chunk())
    except APIError as e:
        yield _held(held) + sse(error_body(e.message, e.type, e.param, e.code))
    except EngineDead as e:
        yield _held(held) + sse(error_body(str(e), "server_error", None, "engine_unavailable"))
    finally:
        await stream.aclose()
    yield "data: [DONE]\n\n"


def _held(held: HeldIds | None) -> str:
    """What a coalesced stream still holds, sent before its error event: ids the router keeps."""
    return held.flush() if held is not None and held.lines else ""


class Merged:
    """A coalesced stream's chunks as one: per choice its text joined and its last finish
    reason, under the first chunk's id, time and model."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.first: dict | None = None
        self.texts: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}

    def add(self, chunk: dict) -> None:
        if self.first is None:
            self.first = chunk
        for ch in chunk["choices"]:
            k = ch["index"]
            text = ch["delta"].get("content") if self.chat else ch["text"]
            self.texts.setdefault(k, []).append(text or "")
            self.finish[k] = ch["finish_reason"] or self.finish.get(k)

    def chunk(self) -> dict:
        assert self.first is not None
        choices = []
        for k in sorted(self.texts):
            text = "".join(self.texts[k])
            body: dict = {"delta": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": k, **body, "logprobs": None, "finish_reason": self.finish.get(k)})
        return {**self.first, "choices": choices}


class ResponseFormat:
    def __init__(self, tokenizer: Tokenizer, model_name: str):
        self.tokenizer = tokenizer
        self.model_name = model_name

    # -- whole responses ---------------------------------------------------------------------

    def completion(self, rid: str, created: int, choices: dict[int, dict], prompts: list[list[int]],
                   cached: int, logprobs: bool) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"index": k, "text": c["text"], "finish_reason": c["reason"],
                             "logprobs": self.completion_logprobs(c["logprobs"], c["tokens"], 0)
                             if logprobs else None} for k, c in choices.items()],
                "usage": usage(prompts, {k: c["count"] for k, c in choices.items()}, cached)}

    def chat(self, rid: str, created: int, choices: dict[int, dict], prompt: list[int],
             cached: int, logprobs: bool) -> dict:
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": k, "message": {"role": "assistant", "content": c["text"]},
                             "finish_reason": c["reason"],
                             "logprobs": self.chat_logprobs(c["logprobs"], c["tokens"]) if logprobs else None}
                            for k, c in choices.items()],
                "usage": usage([prompt], {k: c["count"] for k, c in choices.items()}, cached)}

    # -- streams -------------------------------------------------------------------------------

    def completion_events(self, stream: Outputs, prompts: list[list[int]], rid: str, created: int, n: int,
                          include_usage: bool, trace: bool = False,
                          resumed: Resumed | None = None, coalesce: bool = False) -> AsyncIterator[str]:
        """`coalesce`: the text as one event at the end (only with `trace`; fleetwise/protocol.py)."""
        resumed = resumed or Resumed()
        counts: dict[int, int] = dict(resumed.counts)
        offsets: dict[int, int] = dict(resumed.sent)
        cached = [0]

        def chunk(i: int, out: RequestOutput) -> Chunk:
            key = i * n + out.index
            counts[key] = out.num_output_tokens
            cached[0] = max(cached[0], out.num_cached_tokens)
            if out.error:
                raise APIError(500, f"generation failed: {out.error}", type_="server_error")
            lp = None
            if out.logprobs:
                lp = self.completion_logprobs(out.logprobs, out.token_ids, offsets.get(key, 0))
            offsets[key] = offsets.get(key, 0) + len(out.text)
            if not out.text and not out.finished and lp is None:
                return None
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [{"index": key, "text": out.text, "logprobs": lp,
                                 "finish_reason": out.finish_reason if out.finished else None}]}

        def usage_chunk() -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": self.model_name,
                    "choices": [], "usage": usage(prompts, counts, cached[0])}

        return events(stream, chunk, usage_chunk if include_usage else None,
                      tracer(prompts, rid, created, n, coalesce) if trace else None,
                      Merged(chat=False) if coalesce and trace else None)

    def chat_events(self, stream: Outputs, prompts: list[list[int]], rid: str, created: int, include_usage: bool,
                    logprobs: bool, trace: bool = False, resumed: Resumed | None = None,
                    coalesce: bool = False) -> AsyncIterator[str]:
        resumed = resumed or Resumed()
        counts: dict[int, int] = dict(resumed.counts)
        started: set[int] = set(resumed.started)
        cached = [0]
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_name}

        def chunk(_: int, out: RequestOutput) -> Chunk:
            k = out.index
            counts[k] = out.num_output_tokens
            cached[0] = max(cached[0], out.num_cached_tokens)
            if out.error:
                raise APIError(500, f"generation failed: {out.error}", type_="server_error")
            delta = {"content": out.text}
            lp = self.chat_logprobs(out.logprobs, out.token_ids) if logprobs and out.logprobs else None
            if k not in started:
                started.add(k)
                delta = {"role": "assistant", "content": out.text}
            elif not out.text and not out.finished and lp is None:
                return None  # a token whose text is held back still sends its logprobs
            return {**base, "choices": [{"index": k, "delta": delta, "logprobs": lp,
                                         "finish_reason": out.finish_reason if out.finished else None}]}

        def usage_chunk() -> dict:
            return {**base, "choices": [], "usage": usage(prompts, counts, cached[0])}

        return events(stream, chunk, usage_chunk if include_usage else None,
                      tracer(prompts, rid, created, 1, coalesce) if trace else None,
                      Merged(chat=True) if coalesce and trace else None)

    # -- logprobs ------------------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(self, entries: list[TokenLogprob], token_ids: list[int], offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tid, (lp, top) in zip(token_ids, entries):
            text = self._token_text(tid)
            tokens.append(text)
            lps.append(lp)
            tops.append({self._token_text(t): v for t, v in top})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, entries: list[TokenLogprob], token_ids: list[int]) -> dict:
        content = []
        for tid, (lp, top) in zip(token_ids, entries):
            content.append({
                "token": self._token_text(tid), "logprob": lp, "bytes": list(self.tokenizer.token_bytes(tid)),
                "top_logprobs": [{"token": self._token_text(t), "logprob": v,
                                  "bytes": list(self.tokenizer.token_bytes(t))} for t, v in top],
            })
        return {"content": content}
