"""/metrics: a Prometheus collector that reads the runner, its engine and its cluster at scrape time.

Counters of HTTP requests are kept by the app (edgemoe_http_requests_total); everything else is
read here, so a scrape reports the engine's own figures rather than copies of them.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgemoe.serve.runner import Runner


class RunnerCollector(Collector):
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def collect(self) -> Iterator[Metric]:
        r, t = self.runner, self.runner.totals
        yield GaugeMetricFamily("edgemoe_ready", "1 when requests can be served", value=float(r.unavailable() is None))
        yield GaugeMetricFamily("edgemoe_busy", "1 while a sequence is being generated", value=float(r.busy))
        yield GaugeMetricFamily("edgemoe_slots_active", "sequences being generated now", value=r.active)
        yield GaugeMetricFamily("edgemoe_slots", "sequences that may be generated together (--parallel)", value=r.parallel)
        yield GaugeMetricFamily("edgemoe_queue_depth", "requests waiting for the engine", value=r.queue_depth)
        yield GaugeMetricFamily("edgemoe_queue_size", "most requests that may wait (--queue-size)", value=r.queue_size)
        yield CounterMetricFamily("edgemoe_generations", "generations finished", value=t.requests)
        yield CounterMetricFamily("edgemoe_generations_cancelled", "generations ended by a client that went away",
                                  value=t.cancelled)
        yield CounterMetricFamily("edgemoe_generations_failed", "generations that failed", value=t.failed)
        yield CounterMetricFamily("edgemoe_prompt_tokens", "prompt tokens evaluated", value=t.prompt_tokens)
        yield CounterMetricFamily("edgemoe_completion_tokens", "tokens generated", value=t.completion_tokens)
        yield CounterMetricFamily("edgemoe_decode_seconds", "seconds spent in decode steps", value=t.decode_s)
        yield CounterMetricFamily("edgemoe_prefill_seconds", "seconds spent evaluating prompts", value=t.prefill_s)
        avg = t.decode_steps / t.decode_s if t.decode_s > 0 else 0.0
        yield GaugeMetricFamily("edgemoe_decode_tokens_per_second", "decode speed since start (steps / decode time)",
                                value=avg)
        yield GaugeMetricFamily("edgemoe_last_decode_tokens_per_second", "decode speed of the last generation",
                                value=t.last_decode_tok_s)
        c = r.cluster
        if c is None:
            return
        yield GaugeMetricFamily("edgemoe_workers_expected", "workers the cluster was started with", value=r.expected_workers)
        workers = list(c.workers.values())
        yield GaugeMetricFamily("edgemoe_workers_up", "workers connected now", value=sum(w.alive for w in workers))
        yield GaugeMetricFamily("edgemoe_recall", "expert prediction recall so far (OD-MoE eq. 2-3)", value=c.recall.recall)
        s = c.stats
        yield CounterMetricFamily("edgemoe_stall_seconds", "time decode waited on expert loads (per layer, the slowest)",
                                  value=s.stall_s)
        busy_s = t.decode_s + t.prefill_s
        yield GaugeMetricFamily("edgemoe_stall_share", "stall seconds / generation seconds since start",
                                value=s.stall_s / busy_s if busy_s > 0 else 0.0)
        yield CounterMetricFamily("edgemoe_worker_retries", "expert requests recomputed on another worker", value=s.retries)
        up = GaugeMetricFamily("edgemoe_worker_up", "1 while the worker is connected", labels=["worker"])
        rss = GaugeMetricFamily("edgemoe_worker_rss_bytes", "resident memory the worker last reported", labels=["worker"])
        peak = GaugeMetricFamily("edgemoe_worker_peak_rss_bytes", "peak resident memory the worker reported",
                                 labels=["worker"])
        budget = GaugeMetricFamily("edgemoe_worker_budget_bytes", "the worker's memory budget", labels=["worker"])
        resident = GaugeMetricFamily("edgemoe_worker_resident_experts", "experts the placement keeps on the worker",
                                     labels=["worker"])
        for w in workers:
            up.add_metric([w.name], float(w.alive))
            rss.add_metric([w.name], w.rss)
            peak.add_metric([w.name], w.peak_rss)
            budget.add_metric([w.name], w.budget)
            resident.add_metric([w.name], w.resident)
        yield from (up, rss, peak, budget, resident)
