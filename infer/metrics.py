"""Prometheus metrics of the server, in a registry of its own (one per app):

    qwen35_num_requests_waiting / _running, qwen35_max_num_slots             gauges, read from core.stats()
    qwen35_prompt_tokens_total, qwen35_generation_tokens_total               counters, from core.stats()
    qwen35_generation_tokens_per_second                                      gauge over the last `window` seconds
    qwen35_prefix_cache_hit_rate (hits / queries), _hit_tokens_total, _queries_total, _hits_total, _bytes
    qwen35_time_to_first_token_seconds, qwen35_inter_token_latency_seconds, qwen35_e2e_request_latency_seconds
                                                                             histograms, timed in on_output
    qwen35_requests_finished_total{finish_reason}
    qwen35_spec_decode_num_drafts_total, _num_draft_tokens_total, _num_accepted_tokens_total
                                          speculative decoding (vLLM's names): verify steps, drafted tokens (K per
                                          step), accepted drafts; mean acceptance length = 1 + accepted / drafts

`on_output` runs on the engine core's scheduler thread; everything it touches is thread-safe and it never raises.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)


class TokenRate:
    """Tokens per second over the last `window` seconds (per-second buckets; thread-safe)."""

    def __init__(self, window: float = 10.0):
        self.window, self.started = window, time.monotonic()
        self.buckets: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.lock = threading.Lock()

    def add(self, n: int = 1, now: float | None = None) -> None:
        second = int(now if now is not None else time.monotonic())
        with self.lock:
            self.buckets[second] = self.buckets.get(second, 0) + n
            while self.buckets and next(iter(self.buckets)) < second - self.window:
                self.buckets.popitem(last=False)

    def rate(self, now: float | None = None) -> float:
        now = now if now is not None else time.monotonic()
        with self.lock:
            tokens = sum(n for s, n in self.buckets.items() if s > now - self.window - 1)
        return tokens / max(1.0, min(self.window, now - self.started))


class RequestTimer:
    """Arrival time and the time of the last token of one generation."""

    def __init__(self, arrival: float):
        self.arrival, self.last = arrival, None


class _CoreCollector:
    """Gauges and counters read from core.stats() at scrape time."""

    def __init__(self, core, rate: TokenRate):
        self.core, self.rate = core, rate

    def describe(self):
        return []

    def collect(self):
        s = self.core.stats()
        gauges = [("num_requests_waiting", "Requests waiting for a slot", s["waiting"]),
                  ("num_requests_running", "Requests holding a decode slot (prefilling or decoding)", s["running"]),
                  ("max_num_slots", "Decode slots (max batch)", s["max_batch"]),
                  ("generation_tokens_per_second", f"Generated tokens per second over the last {self.rate.window:g} s",
                   self.rate.rate()),
                  ("prefix_cache_hit_rate", "Prefix-cache hits / lookups",
                   s["prefix_cache_hits"] / s["prefix_cache_queries"] if s["prefix_cache_queries"] else 0.0),
                  ("prefix_cache_bytes", "Bytes held by the prefix cache", s["prefix_cache_bytes"])]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"qwen35_{name}", doc, value=value)
        counters = [("prompt_tokens", "Prefilled prompt tokens", s["prompt_tokens_total"]),
                    ("generation_tokens", "Generated tokens", s["generation_tokens_total"]),
                    ("prefix_cache_queries", "Prefix-cache lookups", s["prefix_cache_queries"]),
                    ("prefix_cache_hits", "Prefix-cache lookups that hit", s["prefix_cache_hits"]),
                    ("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                     s["prefix_cache_hit_tokens"])]
        if s.get("num_speculative_tokens"):
            counters += [("spec_decode_num_drafts", "Speculative verify steps (one per slot per step)",
                          s["spec_decode_num_drafts"]),
                         ("spec_decode_num_draft_tokens", "Tokens drafted by the MTP block",
                          s["spec_decode_num_draft_tokens"]),
                         ("spec_decode_num_accepted_tokens", "Drafted tokens accepted by the target model",
                          s["spec_decode_num_accepted_tokens"])]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"qwen35_{name}", doc, value=value)


class Metrics:
    def __init__(self, core, window: float = 10.0):
        self.registry = CollectorRegistry()
        self.rate = TokenRate(window)
        self.registry.register(_CoreCollector(core, self.rate))
        self.ttft = Histogram("qwen35_time_to_first_token_seconds", "Request arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("qwen35_inter_token_latency_seconds", "Time between a request's consecutive tokens",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("qwen35_e2e_request_latency_seconds", "Request arrival to its last token",
                             buckets=E2E_BUCKETS, registry=self.registry)
        self.finished = Counter("qwen35_requests_finished", "Finished generations by finish reason",
                                ["finish_reason"], registry=self.registry)

    def on_output(self, timer: RequestTimer, finish_reason: str | None, real_token: bool) -> None:
        """Times one output of a generation (called from the scheduler thread)."""
        now = time.perf_counter()
        if real_token:
            if timer.last is None:
                self.ttft.observe(now - timer.arrival)
            else:
                self.itl.observe(now - timer.last)
            timer.last = now
            self.rate.add(1)
        if finish_reason is not None:
            self.e2e.observe(now - timer.arrival)
            self.finished.labels(finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
