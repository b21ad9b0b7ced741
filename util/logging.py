"""Smoothed meters and the original's console line:
`Epoch: [e]  [it/N]  eta: ...  lr: ...  loss: median (global_avg) ...  time: ...  data: ...  max mem: ... MB`."""
from __future__ import annotations

import datetime
import time
from collections import defaultdict, deque

import torch

from util import dist


class SmoothedValue:
    """A window of recent values plus the global average."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """Sums count and total over ranks (the window stays local)."""
        if not dist.is_dist_avail_and_initialized():
            return
        totals = dist.all_gather((self.count, self.total))
        self.count = sum(c for c, _ in totals)
        self.total = sum(t for _, t in totals)

    @property
    def median(self) -> float:
        return torch.tensor(list(self.deque)).median().item() if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def global_averages(self) -> dict[str, float]:
        return {k: meter.global_avg for k, meter in self.meters.items()}

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable, print_freq: int, header: str = ""):
        """Yields the items of `iterable`, printing the console line every `print_freq` items and at the end."""
        total = len(iterable)
        width = len(str(total))
        start = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f"[{i:>{width}}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 1024 ** 2:.0f}")
                print(self.delimiter.join(parts), flush=True)
            end = time.time()
        total_time = datetime.timedelta(seconds=int(time.time() - start))
        print(f"{header} Total time: {total_time} ({(time.time() - start) / max(total, 1):.4f} s / it)", flush=True)
