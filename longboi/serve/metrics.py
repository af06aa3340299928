"""Prometheus text-format metrics, kept in-process (no client library needed to expose them)."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable

PREFIX = "longboi_"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HISTOGRAMS = {
    "time_to_first_token_seconds": ("Time from request arrival to its first generated token.", LATENCY_BUCKETS),
    "e2e_request_latency_seconds": ("Time from request arrival to its last token.", LATENCY_BUCKETS),
    "batch_size": ("Sequences decoded together per decode step.", (1, 2, 4, 8, 16, 32, 64, 128, 256)),
}
COUNTERS = {
    "prompt_tokens": "Prompt tokens prefilled.",
    "generation_tokens": "Tokens generated.",
    "prefix_cache_hit_tokens": "Prompt tokens taken from the prefix cache instead of computed.",
    "preemptions": "Sequences preempted when the KV-cache blocks ran out (recomputed later).",
}


class Metrics:
    """Counters and histograms updated from the engine thread, rendered for GET /metrics."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[str, float] = defaultdict(float)
        self.labelled: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(lambda: defaultdict(float))
        self.buckets = {name: [0] * (len(b) + 1) for name, (_, b) in HISTOGRAMS.items()}
        self.sums: dict[str, float] = defaultdict(float)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def count(self, name: str, n: float = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def count_labelled(self, name: str, n: float = 1, **labels: str) -> None:
        with self.lock:
            self.labelled[name][tuple(sorted(labels.items()))] += n

    def observe(self, name: str, value: float) -> None:
        bounds = HISTOGRAMS[name][1]
        with self.lock:
            self.buckets[name][bisect.bisect_left(bounds, value)] += 1
            self.sums[name] += value

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        lines: list[str] = []
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} gauge", f"{PREFIX}{name} {read()}"]
        with self.lock:
            for name, help_text in COUNTERS.items():
                full = f"{PREFIX}{name}_total"  # the text format's TYPE line names the sample itself
                lines += [f"# HELP {full} {help_text}", f"# TYPE {full} counter", f"{full} {self.counters[name]}"]
            for name, series in self.labelled.items():
                lines += [f"# TYPE {PREFIX}{name}_total counter"]
                for labels, value in sorted(series.items()):
                    text = ",".join(f'{k}="{v}"' for k, v in labels)
                    lines.append(f"{PREFIX}{name}_total{{{text}}} {value}")
            for name, (help_text, bounds) in HISTOGRAMS.items():
                lines += self._histogram(name, help_text, bounds)
        return "\n".join(lines) + "\n"

    def _histogram(self, name: str, help_text: str, bounds: tuple) -> list[str]:
        full, counts = f"{PREFIX}{name}", self.buckets[name]
        lines = [f"# HELP {full} {help_text}", f"# TYPE {full} histogram"]
        running = 0
        for bound, n in zip(list(bounds) + ["+Inf"], counts):
            running += n
            lines.append(f'{full}_bucket{{le="{bound}"}} {running}')
        return lines + [f"{full}_sum {self.sums[name]}", f"{full}_count {running}"]
