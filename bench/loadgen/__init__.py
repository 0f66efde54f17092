"""A load generator for OpenAI-compatible servers (this engine or ``vllm serve``).

    python -m bench.loadgen write --workload chat-short --rate 2 --duration 60 --scale 8 -o w.jsonl
    python -m bench.loadgen run --url http://127.0.0.1:8000 --workload-file w.jsonl \\
        --model NAME --json result.json
    python -m bench.loadgen plot result.json [more.json ...] -o plots/

Workloads come from ``engine.sim.workloads`` (seeded, token-level) and are written once as JSON
lines, so every server is driven by exactly the same requests. ``run`` replays a file over
HTTP with streaming ``/v1/completions`` and measures what ``vllm bench serve`` measures (see
``../shared/WORKLOADS.md`` and ``docs/benchmarks.md``). It talks to the server only over HTTP,
so it needs nothing from the engine's serving code.

Modules: ``client`` (one streamed request, its timings and outcome), ``replay`` (arrivals,
multi-turn dependencies, concurrency), ``metrics`` (the summary), ``report`` (the table),
``plots`` (PNG figures), ``cli`` (the three commands).
"""
