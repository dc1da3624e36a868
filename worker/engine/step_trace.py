"""Every engine step's makeup and times, one JSON line per step: what `fleetwise sim agree`
fits a worker's step profile from and sets beside the simulator's steps.

Off unless the environment variable FLEETWISE_STEP_TRACE names a folder; each worker process
then writes `steps-PID.jsonl` there. A line holds the step's start (`t`, `time.perf_counter`,
the monotonic clock every process on the machine shares), its wall seconds (`s`), the engine
thread's CPU seconds (`cpu`), the prompt tokens computed (`p`), the decodes (`d`), the cached
tokens those decodes read (`c`), the prompt's attention (`a`: each prompt chunk's tokens times
the position its last token reaches; it grows with a prompt's square), the sequences left
running or waiting after it (`left`: when more than 0 the loop steps again at once, so the time
to the next step's start is the loop's own overhead, not idleness), and for each sequence
whose first token the step makes, its request id and when the engine took it in (`first`: the
time from a client's request to its first token splits into the way in, the engine's part,
and the way out).
"""

import json
import os
from pathlib import Path
from typing import IO, Any

ENV = "FLEETWISE_STEP_TRACE"


def firsts(batch: Any) -> list[tuple[str, float]]:
    """(request id, when the engine took it in) of each sequence whose prompt the scheduled
    batch completes: its first token comes out of this step."""
    return [(seq.request_id, seq.arrival_time) for seq, n in zip(batch.seqs, batch.num_new_tokens)
            if seq.num_computed_tokens < seq.num_prompt_tokens <= seq.num_computed_tokens + n]


def makeup(batch: Any) -> tuple[int, int, int, int]:
    """(prompt tokens, decodes, cached tokens the decodes read, prompt attention: each prompt
    chunk's tokens times the position its last token reaches) of a scheduled batch, read
    before the step computes it."""
    prompt = decodes = context = attended = 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        if n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens:
            decodes += 1
            context += seq.num_computed_tokens + 1
        else:
            prompt += n
            attended += n * (seq.num_computed_tokens + n)
    return prompt, decodes, context, attended


class StepTrace:
    def __init__(self, path: Path):
        # open for the worker's life; line-buffered: a killed worker loses no step
        self._file: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115

    def record(self, start: float, seconds: float, cpu: float, made: tuple[int, int, int, int], left: int,
               first: list[tuple[str, float]]) -> None:
        p, d, c, a = made
        line: dict[str, Any] = {"t": round(start, 6), "s": round(seconds, 6), "cpu": round(cpu, 6),
                                "p": p, "d": d, "c": c, "a": a, "left": left}
        if first:
            line["first"] = [[rid, round(t, 6)] for rid, t in first]
        self._file.write(json.dumps(line) + "\n")


def from_env() -> StepTrace | None:
    folder = os.environ.get(ENV)
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return StepTrace(Path(folder) / f"steps-{os.getpid()}.jsonl")


def read(path: Path) -> list[dict[str, Any]]:
    """A trace file's steps, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
