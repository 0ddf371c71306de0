"""Prefix-aware routing against the baselines, on a local Ray cluster.

    python -m load_tests.bench_routing [--replicas 4] [--prefixes 4] [--prefix-tokens 2048] [--requests 48]

Traffic: `requests` completions, each one of `prefixes` distinct long shared prefixes plus a
short unique suffix, `concurrency` at a time. For each router mode, a fresh application: the hit
rate (cached prompt tokens over the ideal, i.e. every request after the first of its prefix hits
its whole prefix) and TTFT p50/p90 measured at the client through streaming.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import time


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _traffic(base: str, prompts: list[list[int]], concurrency: int) -> list[tuple[float, int]]:
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(p):
        async with gate:
            t = time.perf_counter()
            ttft, cached = None, 0
            stream = await client.completions.create(model="tiny", prompt=p, max_tokens=4, temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
            async for chunk in stream:
                if ttft is None and chunk.choices:
                    ttft = time.perf_counter() - t
                if chunk.usage is not None:
                    cached = chunk.usage.prompt_tokens_details.cached_tokens
            return ttft, cached

    return await asyncio.gather(*[one(p) for p in prompts])


def run(modes: list[str], replicas: int, n_prefixes: int, prefix_tokens: int, n_requests: int, concurrency: int) -> list[dict]:
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.profiles import EndpointProfile
    from workers.pools import BLOCK

    rng = random.Random(0)
    prefixes = [[rng.randrange(2, 258) for _ in range(prefix_tokens)] for _ in range(n_prefixes)]
    order = [rng.randrange(n_prefixes) for _ in range(n_requests)]
    prompts = [prefixes[k] + [rng.randrange(2, 258) for _ in range(32)] for k in order]
    seen, ideal = set(), 0
    for k in order:
        ideal += (prefix_tokens // BLOCK) * BLOCK if k in seen else 0
        seen.add(k)
    # logical CPUs: one per engine replica plus the ingress, whatever the host has (they share it)
    ray.init(num_cpus=replicas + 2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    rows = []
    try:
        for mode in modes:
            port = _port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            profile = EndpointProfile(name="bench", replicas=replicas, router=mode, kv_budget_gib=0.25,
                                      max_context=prefix_tokens + 512, max_running_per_replica=8)
            serve.run(build_app(profile), name="v4serve", route_prefix="/")
            results = asyncio.run(_traffic(f"http://127.0.0.1:{port}", prompts, concurrency))
            serve.shutdown()
            ttfts = sorted(r[0] for r in results)
            rows.append({"router": mode, "hit_rate_of_ideal": sum(r[1] for r in results) / ideal,
                         "ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
                         "requests": n_requests, "replicas": replicas, "prefixes": n_prefixes,
                         "prefix_tokens": prefix_tokens, "concurrency": concurrency})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="prefix_aware,round_robin,least_loaded")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--prefix-tokens", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()
    rows = run(a.modes.split(","), a.replicas, a.prefixes, a.prefix_tokens, a.requests, a.concurrency)
    base = next((r for r in rows if r["router"] == "round_robin"), None)
    print(f"\n{'router':>13} {'hit/ideal':>10} {'TTFT p50 s':>11} {'TTFT p90 s':>11} {'p90 / RR':>9}")
    for r in rows:
        ratio = r["ttft_p90_s"] / base["ttft_p90_s"] if base else float("nan")
        print(f"{r['router']:>13} {r['hit_rate_of_ideal']:10.2f} {r['ttft_p50_s']:11.3f} {r['ttft_p90_s']:11.3f} {ratio:9.2f}")


if __name__ == "__main__":
    main()
