"""Prometheus metrics of the frontend, served at ``/metrics``.

Names follow vLLM's where vLLM has the metric (``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``, ``vllm:time_to_first_token_seconds``, ...) with its
``model_name`` label, so that the Gateway API Inference Extension, llm-d and existing
Grafana dashboards read this engine unchanged. The engine's own metrics are prefixed
``engine:`` (step batch sizes and times, per-worker KV usage and queue depth, predicted
versus realized cached tokens, shed and rejected requests, queue time by priority class).

Three sources feed them: every request's lifecycle (``RequestTimer``, driven by
``serving.generate``), every ``PoolStats`` a pool sends (step samples), and, at scrape time,
the latest ``PoolStats`` of each pool (gauges and the pool's cumulative counters).

Two info-style gauges (value 1, the facts in labels) are what routers read to learn a
replica: ``vllm:cache_config_info`` with vLLM's label names (``block_size``,
``num_gpu_blocks``, ``cache_dtype``, ``enable_prefix_caching``; llm-d and KV-event indexers
take the block size from it), one sample per worker (vLLM's ``engine`` label, the worker id;
``num_gpu_blocks`` is that worker's capacity), and ``vllm:lora_requests_info`` (``max_lora``,
``waiting_lora_adapters``, ``running_lora_adapters``), declared but empty: the engine serves
no LoRA adapters, and an absent sample is what vLLM shows without LoRA.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.frontend.pool_client import PoolClient
from engine.messages import EngineRequest, Explanation, PoolStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets as vLLM's, so dashboards built for vLLM show the same resolution.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# vLLM's label names. cache_dtype "auto": the KV cache has the model's dtype (no KV
# quantization); prefix caching is always on.
CACHE_INFO_LABELS = ("engine", "block_size", "num_gpu_blocks", "cache_dtype",
                     "enable_prefix_caching")
LORA_INFO_LABELS = ("max_lora", "waiting_lora_adapters", "running_lora_adapters")


def priority_class(priority: int) -> str:
    """``critical`` (> 0), ``normal`` (0) or ``sheddable`` (< 0)."""
    return "critical" if priority > 0 else "sheddable" if priority < 0 else "normal"


class EngineMetrics:
    """Every metric of one frontend, in its own registry (tests build several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, m = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Time from arrival to the first generated token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Time between consecutive generated tokens.", m,
                             buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds",
                              "Per request: (E2E - TTFT) / (output tokens - 1).", m,
                              buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "Time from arrival to the last token.", m,
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("vllm:request_queue_time_seconds",
                                    "Time from arrival to first being scheduled.", m,
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of finished requests.",
                                     m, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", m,
                                         registry=r)
        self.request_prompt = Histogram("vllm:request_prompt_tokens",
                                        "Prompt tokens per request.", m,
                                        buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation = Histogram("vllm:request_generation_tokens",
                                            "Generated tokens per request.", m,
                                            buckets=TOKEN_BUCKETS, registry=r)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               [*m, "finished_reason"], registry=r)
        # The engine's own.
        self.queue_by_priority = Histogram("engine:queue_time_seconds",
                                           "Queue time by priority class.",
                                           [*m, "priority_class"], buckets=REQUEST_BUCKETS,
                                           registry=r)
        self.ttft_by_priority = Histogram("engine:time_to_first_token_seconds",
                                          "TTFT by priority class.", [*m, "priority_class"],
                                          buckets=TTFT_BUCKETS, registry=r)
        self.predicted_cached = Counter("engine:predicted_cached_tokens",
                                        "Cached prefix tokens the placement predicted.", m,
                                        registry=r)
        self.realized_cached = Counter("engine:realized_cached_tokens",
                                       "Cached prefix tokens found at admission.", m, registry=r)
        self.refused = Counter("engine:requests_refused",
                               "Requests refused before reaching a pool, by reason "
                               "(shed, rate_limit, auth, invalid, queue_timeout, ...).",
                               [*m, "reason", "priority_class"], registry=r)
        self.batch_size = Histogram("engine:batch_size", "Requests per step.", m,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_tokens = Histogram("engine:step_tokens", "Tokens run per step.", m,
                                     buckets=BATCH_BUCKETS, registry=r)
        self.step_time = Histogram("engine:step_time_seconds",
                                   "Step time, plan sent to result received.", m,
                                   buckets=STEP_BUCKETS, registry=r)
        self._pools = _PoolCollector()
        self.registry.register(self._pools)

    def add_pool(self, model_name: str, pool: PoolClient) -> None:
        """Export a pool's gauges (read from its latest stats at scrape time) and record its
        step samples as they arrive."""
        self._pools.pools[model_name] = pool
        pool.stats_listeners.append(lambda s: self.observe_steps(model_name, s))

    def observe_steps(self, model_name: str, stats: PoolStats) -> None:
        for size in stats.step_batch_sizes:
            self.batch_size.labels(model_name).observe(size)
        for tokens in stats.step_num_tokens:
            self.step_tokens.labels(model_name).observe(tokens)
        for seconds in stats.step_times_s:
            self.step_time.labels(model_name).observe(seconds)

    def request_timer(self, model_name: str, request: EngineRequest) -> RequestTimer:
        return RequestTimer(self, model_name, request)

    def count_refused(self, model_name: str, reason: str, priority: int) -> None:
        self.refused.labels(model_name, reason, priority_class(priority)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's latencies, measured in the frontend from its arrival."""

    def __init__(self, metrics: EngineMetrics, model_name: str, request: EngineRequest) -> None:
        self.m = metrics
        self.model = model_name
        self.priority = request.priority
        self.prompt_tokens = len(request.prompt_token_ids)
        self.start = request.arrival_time or time.time()
        self.first: float | None = None
        self.last = self.start
        self._itl = metrics.itl.labels(model_name)  # once, not per token (a locked lookup)

    def tokens(self, n: int) -> None:
        """``n`` new tokens arrived now (one output may carry several)."""
        now = time.time()
        if self.first is None:
            self.first = now
            self.m.ttft.labels(self.model).observe(now - self.start)
            self.m.ttft_by_priority.labels(self.model, priority_class(self.priority)).observe(
                now - self.start)
            n -= 1
        gap = (now - self.last) / max(n, 1)
        itl = self._itl
        for _ in range(n):
            itl.observe(gap)
        self.last = now

    def finish(self, reason: str, completion_tokens: int, explanation: Explanation | None,
               cached_tokens: int = 0) -> None:
        m, model = self.m, self.model
        now = time.time()
        m.e2e.labels(model).observe(now - self.start)
        m.success.labels(model, reason).inc()
        m.prompt_tokens.labels(model).inc(self.prompt_tokens)
        m.generation_tokens.labels(model).inc(completion_tokens)
        m.request_prompt.labels(model).observe(self.prompt_tokens)
        m.request_generation.labels(model).observe(completion_tokens)
        if self.first is not None and completion_tokens > 1:
            m.tpot.labels(model).observe((now - self.first) / (completion_tokens - 1))
        if explanation is not None:
            m.queue_time.labels(model).observe(explanation.queue_time_s)
            m.queue_by_priority.labels(model, priority_class(self.priority)).observe(
                explanation.queue_time_s)
            m.predicted_cached.labels(model).inc(explanation.predicted_cached_tokens)
            m.realized_cached.labels(model).inc(explanation.realized_cached_tokens)


class _PoolCollector(Collector):
    """Gauges and cumulative counters read from each pool's latest stats at scrape time."""

    def __init__(self) -> None:
        self.pools: dict[str, PoolClient] = {}

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: collected at scrape time only

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name"]
        running = GaugeMetricFamily("vllm:num_requests_running",
                                    "Requests in a batch on some worker.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting",
                                    "Requests waiting to be scheduled.", labels=labels)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc",
                               "KV-cache usage, 0 to 1, mean over the pool's workers.",
                               labels=labels)
        queries = CounterMetricFamily("vllm:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.",
                                      labels=labels)
        hits = CounterMetricFamily("vllm:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.", labels=labels)
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Preemptions.", labels=labels)
        live = GaugeMetricFamily("engine:live_workers", "Workers serving the pool.",
                                 labels=labels)
        worker_kv = GaugeMetricFamily("engine:worker_kv_usage_perc",
                                      "KV-cache usage of one worker, 0 to 1.",
                                      labels=[*labels, "worker"])
        worker_queue = GaugeMetricFamily("engine:worker_queue_depth",
                                         "Requests waiting on one worker.",
                                         labels=[*labels, "worker"])
        cache_info = GaugeMetricFamily("vllm:cache_config_info",
                                       "Information of the KV cache config (value 1).",
                                       labels=[*labels, *CACHE_INFO_LABELS])
        lora_info = GaugeMetricFamily("vllm:lora_requests_info",
                                      "Running stats on LoRA requests (none: no LoRA).",
                                      labels=list(LORA_INFO_LABELS))
        for name, pool in self.pools.items():
            stats = pool.stats
            if stats is None:
                continue
            running.add_metric([name], stats.num_running)
            waiting.add_metric([name], stats.num_waiting)
            usage = stats.kv_usage
            kv.add_metric([name], sum(usage) / len(usage) if usage else 0.0)
            queries.add_metric([name], stats.prefix_query_tokens)
            hits.add_metric([name], stats.prefix_hit_tokens)
            preemptions.add_metric([name], stats.num_preemptions)
            live.add_metric([name], stats.live_workers)
            for w, u in zip(stats.worker_ids, usage, strict=False):
                worker_kv.add_metric([name, str(w)], u)
            for w, depth in zip(stats.worker_ids, stats.num_waiting_per_worker, strict=False):
                worker_queue.add_metric([name, str(w)], depth)
            for w, blocks in zip(stats.worker_ids, stats.num_blocks, strict=False):
                cache_info.add_metric([name, str(w), str(stats.block_size), str(blocks),
                                       "auto", "True"], 1.0)
        yield from (running, waiting, kv, queries, hits, preemptions, live, worker_kv,
                    worker_queue, cache_info, lora_info)
