"""The device's busy time in a step: what a slow GPU changes, and what a busy host does not.

Wall time per step is a poor signal of a slow device on a shared host: a step waits for the
CPU as much as it computes. The clock reads the device's own time instead.

- CUDA: events recorded on the current stream around the forward pass; `stop` waits for the
  end event (the sampler has usually synchronised already to read the tokens) and returns the
  GPU time between the events.
- CPU: the engine thread's CPU seconds (`time.thread_time`) around the forward pass, which
  leave out the time the thread waited for a core, slept or waited for the GIL. With one
  intra-op torch thread (`OMP_NUM_THREADS=1`, how CPU workers are run next to each other)
  this is all of the forward's compute. With more, it is the engine thread's own share plus
  its spinning at the pool's barriers, which grows when the other pool threads wait for a
  core: still proportional to the work, but no longer free of contention. The process's CPU
  time is not used: it also counts the HTTP threads, which serve whatever load arrives.
  The CPU is host and device at once, so the separation is not complete: a step after the
  thread slept starts with caches other processes filled meanwhile (a slow host's 40 ms pause
  per step costs 1.04-1.09x CPU time per token on a quiet machine, 1.14-1.24x beside two
  memory-streaming processes, 1.38x seen once), while its wall time rises 4x.

`burn(seconds)` keeps the device busy for that much more device time, as a slower device
would take: on CUDA a spin kernel on the stream (`torch.cuda._sleep`, its cycles per second
measured once), on the CPU repeated small matrix products on the engine thread until its CPU
time has advanced by `seconds` (real work, which a busy host slows as it slows the forward;
the GIL is free during each product, as it is while a GPU computes)."""

import time

import torch

BURN_SIZE = 48                 # the CPU burn's matrices: small, so that the last one overshoots little
CALIBRATION_CYCLES = 10_000_000  # one spin kernel long enough to time against events


class DeviceClock:
    """Device seconds between `start` and `stop`, and more of them on demand (`burn`)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._t0 = 0.0
        self._start: torch.cuda.Event | None = None
        self._cycles_per_second = 0.0
        self._a = torch.rand(BURN_SIZE, BURN_SIZE) if not self.cuda else None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.thread_time()

    def stop(self) -> float:
        if not self.cuda:
            return time.thread_time() - self._t0
        assert self._start is not None, "stop before start"
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self._start.elapsed_time(end) / 1000.0

    def burn(self, seconds: float) -> float:
        """Busies the device for about `seconds` more; returns the device seconds it took."""
        if seconds <= 0:
            return 0.0
        cycles = max(1, int(seconds * self.cycles_per_second())) if self.cuda else 0
        self.start()
        if self.cuda:
            torch.cuda._sleep(cycles)
        else:
            assert self._a is not None
            end, now, last = self._t0 + seconds, self._t0, 0.0
            while end - now > last / 2:  # stop where the next product would overshoot more than fall short
                torch.mm(self._a, self._a)
                now, last = time.thread_time(), time.thread_time() - now
        return self.stop()

    def cycles_per_second(self) -> float:
        """The spin kernel's speed, measured on first use."""
        if not self._cycles_per_second:
            torch.cuda._sleep(1000)  # loaded before it is timed
            self.start()
            torch.cuda._sleep(CALIBRATION_CYCLES)
            self._cycles_per_second = CALIBRATION_CYCLES / max(self.stop(), 1e-6)
        return self._cycles_per_second
