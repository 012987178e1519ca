"""CPU training that makes room when other processes keep cores busy.

torch splits every matmul across its intra-op threads, one per core, and each parallel region waits for
its slowest thread. When another process holds a core, the thread that shares it runs a fraction of the
time and the whole step waits for it: on a 2-core machine beside one busy process, the trainer ran at
30-39 non-pad tokens/s on two threads and 65-80 on one (`benchmarks/throughput.py --busy`). Fewer
threads than free cores loses at most that core's share.

`CoreShare` measures how many cores other processes used since it last looked (the machine's busy time
in /proc/stat minus this process's own CPU time); `threads_for` turns that into a thread count; the
trainer's `threads_callback` applies it between optimizer steps and logs each change.
`benchmarks/throughput.py --busy` measures it beside a busy process.
"""

from __future__ import annotations

import os
import time

CHECK_SECONDS = 2.0  # the shortest interval measured: steps shorter than this are averaged together


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads_for(others: float, n_cores: int) -> int:
    """Threads for this process when other processes use ``others`` cores: one per core they leave free,
    a core counted busy from half its time, and at least one."""
    return max(1, n_cores - int(others + 0.5))


class CoreShare:
    """Cores used by other processes, from the machine's busy time less this process's own."""

    def __init__(self):
        self.n_cores = cores()
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = f.readline().split()
        except OSError:  # not Linux: nothing to measure
            return None
        # cpu user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        values = [int(v) for v in fields[1:9]]
        busy = (sum(values) - values[3] - values[4]) / self._hz
        t = os.times()
        return time.monotonic(), busy, t.user + t.system

    def others(self) -> float | None:
        """Cores other processes used on average since the last call (None where it cannot be measured,
        or when less than `CHECK_SECONDS` have passed)."""
        now = self._sample()
        if now is None or self._last is None:
            return None
        wall = now[0] - self._last[0]
        if wall < CHECK_SECONDS:
            return None
        busy, own = now[1] - self._last[1], now[2] - self._last[2]
        self._last = now
        return min(float(self.n_cores), max(0.0, (busy - own) / wall))


def threads_callback(log, fixed: int | None = None):
    """A TrainerCallback for torch's intra-op threads while training: ``fixed`` threads, or before each
    optimizer step the cores other processes leave free (`threads_for`), each change logged. At the end the
    process (the app, its chat) gets the count it had."""
    import torch
    from transformers import TrainerCallback

    class Threads(TrainerCallback):
        def __init__(self):
            self.share = CoreShare()
            self.initial = torch.get_num_threads()

        def on_train_begin(self, args, state, control, **kw):
            if fixed:
                torch.set_num_threads(fixed)
                log(f"CPU threads: {fixed} (as configured)")

        def on_step_begin(self, args, state, control, **kw):
            others = None if fixed else self.share.others()
            if others is None:
                return
            want, have = threads_for(others, self.share.n_cores), torch.get_num_threads()
            if want != have:
                torch.set_num_threads(want)
                log(f"CPU threads {have} -> {want}: other processes used {others:.1f} of "
                    f"{self.share.n_cores} cores over the last {CHECK_SECONDS:g}+ s")

        def on_train_end(self, args, state, control, **kw):
            torch.set_num_threads(self.initial)

    return Threads()
