"""The OpenAI-compatible endpoint on a local Ray cluster, through the official `openai` client."""

import asyncio
import socket

import pytest
import requests

from cluster.app import build_app
from cluster.openai_api import ChatMessage, chat_prompt
from cluster.profiles import EndpointProfile
from workers.engine import Engine
from workers.loader import load_model
from workers.sampling import SamplingParams
from workers.tokenizer import EOS_TEXT

PROFILE = EndpointProfile(name="test", model="tiny", replicas=2, kv_budget_gib=0.05, max_context=4096,
                          max_running_per_replica=8, max_queued_per_replica=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORTS = (free_port(), free_port())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One Ray cluster for these tests: two simulated nodes (ray.cluster_utils), node_a and node_b."""
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.cluster_utils import Cluster

    env = {"V4SERVE_CACHE": str(tmp_path_factory.mktemp("cache")), "OMP_NUM_THREADS": "1"}
    # each node exports metrics on a port of its own, reported every half second (see test_metrics...)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 6, "resources": {"node_a": 100}, "metrics_export_port": METRICS_PORTS[0],
        "_system_config": {"metrics_report_interval_ms": 500}})
    cluster.add_node(num_cpus=6, resources={"node_b": 100}, metrics_export_port=METRICS_PORTS[1])
    ray.init(address=cluster.address, include_dashboard=False, configure_logging=False, runtime_env={"env_vars": env})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(PROFILE), name="v4serve", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("V4SERVE_CACHE", str(tmp_path_factory.mktemp("refcache")))
    model, tok = load_model("tiny", rounding=True)
    engine = Engine(model, PROFILE.engine_config(), tokenizer=tok)

    def complete(ids: list[int], max_tokens: int) -> str:
        rid = engine.add_request(ids, SamplingParams(max_tokens=max_tokens, temperature=0))
        engine.run()
        return engine.seqs[rid].text

    return tok, complete


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_completions_plain_and_streamed_equal_the_in_process_engine(client, reference):
    tok, complete = reference
    want = complete(tok.encode("The sliding window"), 12)
    got = client.completions.create(model="tiny", prompt="The sliding window", max_tokens=12, temperature=0)
    assert got.choices[0].text == want
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(tok.encode("The sliding window")), 12)
    chunks = list(client.completions.create(model="tiny", prompt="The sliding window", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_plain_and_streamed_equal_the_in_process_engine(client, reference):
    tok, complete = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a window size."}]
    prompt = chat_prompt([ChatMessage(**m) for m in messages], EOS_TEXT)
    want = complete(tok.encode(prompt, add_bos=True), 10)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def concurrent_texts(base_url: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy completions of all prompts sent at once through the official async client."""
    openai = pytest.importorskip("openai")

    async def run():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        return await asyncio.gather(*[client.completions.create(model="tiny", prompt=p, max_tokens=max_tokens,
                                                                temperature=0) for p in prompts])

    return [r.choices[0].text for r in asyncio.run(run())]


def test_32_concurrent_requests_all_complete_with_their_own_tokens(server, reference):
    tok, complete = reference
    prompts = [f"request {i} " * (1 + i % 7) for i in range(32)]
    assert concurrent_texts(server + "/v1", prompts, 6) == [complete(tok.encode(p), 6) for p in prompts]


def scrape(name: str) -> dict[str, float]:
    """Prometheus samples of metric `name` over both nodes: labels -> value. (Ray prefixes `ray_`;
    counters end in `_total`, histograms have `_count`, `_sum`, `_bucket` series.)"""
    out = {}
    for port in METRICS_PORTS:
        for line in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
            if line.startswith(f"ray_{name}{{") or line.startswith(f"ray_{name} "):
                labels, value = line.rsplit(" ", 1)
                out[labels] = float(value)
    return out


def test_metrics_count_requests_tokens_pages_and_time_to_first_token(server):
    import time

    body = {"model": "tiny", "prompt": "count me", "max_tokens": 7, "temperature": 0, "ignore_eos": True}
    before = sum(scrape("v4serve_output_tokens_total").values())
    for _ in range(3):
        assert requests.post(server + "/v1/completions", json=body, timeout=60).status_code == 200
    assert requests.post(server + "/v1/completions", json={**body, "model": "nope"}, timeout=60).status_code == 404
    deadline = time.time() + 30
    while True:  # each process exports its metrics every 0.5 s, the ingress's errors on their own
        tokens = sum(scrape("v4serve_output_tokens_total").values()) - before
        errors, blocks = scrape("v4serve_request_errors_total"), scrape("v4serve_kv_blocks")
        done = tokens >= 21 and any('status="404"' in k for k in errors) and len(blocks) == 2
        if done or time.time() > deadline:
            break
        time.sleep(0.5)
    assert tokens == 21
    assert any('reason="length"' in k and v >= 3 for k, v in scrape("v4serve_requests_finished_total").items())
    assert sum(scrape("v4serve_time_to_first_token_seconds_count").values()) >= 3
    assert any('status="404"' in k for k in scrape("v4serve_request_errors_total"))
    blocks, free = scrape("v4serve_kv_blocks"), scrape("v4serve_kv_free_blocks")
    assert len(blocks) == 2 and all(0 < v for v in blocks.values())  # one gauge per replica
    assert all(0 <= v <= max(blocks.values()) for v in free.values())


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "tiny", "prompt": "x", "top_p": 3}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n=1"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens=5000"),
    ({"model": "tiny", "prompt": "x" * 5000}, 400, "context limit"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt is empty"),
    ({"model": "other", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny"}, 400, "prompt"),
])
def test_bad_requests_get_openai_error_bodies(server, body, status, fragment):
    r = requests.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and err["type"]


def test_models_and_health(server):
    assert requests.get(server + "/health", timeout=30).json() == {"status": "ok"}
    models = requests.get(server + "/v1/models", timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    r = requests.post(server + "/v1/chat/completions", data=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_prefix_aware_routing_sends_a_shared_prefix_to_the_replica_holding_it(client):
    import time

    prefix = "shared repository context " * 40  # 1080 tokens: 4 full blocks
    client.completions.create(model="tiny", prompt=prefix + "first", max_tokens=2, temperature=0)
    time.sleep(1.5)  # replicas publish their prefix caches to the directory every 0.2 s
    hits = [client.completions.create(model="tiny", prompt=prefix + f"question {i}", max_tokens=2, temperature=0)
            .usage.prompt_tokens_details.cached_tokens for i in range(4)]
    assert hits == [4 * 256] * 4  # round-robin over 2 replicas would miss about half of these


def test_disaggregated_prefill_and_decode_give_the_in_process_tokens(server, reference):
    """A second application: 2 prefill replicas on node_a, 2 decode replicas on node_b, each
    request's state moving between nodes over a gloo pair channel (kept per pair; long prompts
    stream their entries chunk by chunk while the prefill runs)."""
    openai = pytest.importorskip("openai")
    from ray import serve

    tok, complete = reference
    profile = PROFILE.model_copy(update={"name": "pd", "prefill_replicas": 2, "replicas": 2,
                                         "prefill_resources": {"node_a": 1}, "decode_resources": {"node_b": 1}})
    serve.run(build_app(profile), name="pd", route_prefix="/pd")
    try:
        prompts = [f"disaggregated {i} " * (1 + 9 * (i % 4)) for i in range(16)]
        prompts += [f"a long shared document, part {i}; " * 45 for i in range(2)]  # ~1400 tokens: streamed in chunks
        assert concurrent_texts(server + "/pd/v1", prompts, 6) == [complete(tok.encode(p), 6) for p in prompts]
        client = openai.OpenAI(base_url=server + "/pd/v1", api_key="unused", max_retries=0)
        chunks = client.completions.create(model="tiny", prompt=prompts[3], max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks) == complete(tok.encode(prompts[3]), 6)
        # prefill replicas lost: their requests are prefilled on the decode side (or wait for the
        # replacements), and still give the same tokens
        import ray

        for a in ray.util.list_named_actors(all_namespaces=True):
            if "PrefillReplica" in a["name"] and "pd#" in a["name"]:
                ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
        assert concurrent_texts(server + "/pd/v1", prompts[-3:], 6) == [complete(tok.encode(p), 6) for p in prompts[-3:]]
    finally:
        serve.delete("pd")


def replica_stats(app: str, deployment: str) -> list[dict]:
    """stats() of every replica of a deployment (each addressed through the router's sticky key)."""
    import ray
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    ids = [a["name"].rsplit("#", 1)[-1] for a in ray.util.list_named_actors(all_namespaces=True)
           if f"{app}#{deployment}#" in a["name"]]
    out = [handle.stats.remote({"replica": r}).result(timeout_s=30) for r in ids]
    assert [s["replica"] for s in out] == ids, (ids, [s["replica"] for s in out])
    return out


def test_a_client_that_closes_its_stream_frees_the_pages_of_its_request(server):
    import time

    body = {"model": "tiny", "prompt": "a long answer please", "max_tokens": 4000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    assert not any(s["running"] for s in replica_stats("v4serve", "EngineReplica"))  # (also readies the handle)
    with requests.post(server + "/v1/completions", json=body, stream=True, timeout=120) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith(b"data:"))
        deadline = time.time() + 10
        while True:  # the request holds pages while it streams (its 4000 tokens take far longer)
            during = replica_stats("v4serve", "EngineReplica")
            if any(s["running"] for s in during) or time.time() > deadline:
                break
            time.sleep(0.1)
        if not sum(sum(s["pages_in_use"].values()) for s in during):  # say what the stream was instead
            rest = [line for line in lines if line.startswith(b"data:")]
            raise AssertionError(f"no pages held while streaming: {during}; stream {first[:200]} + {len(rest)} "
                                 f"events, last {rest[-2:]}")
    # the connection is closed: the ingress cancels the stream, the replica aborts and frees
    deadline = time.time() + 30
    while True:
        stats = replica_stats("v4serve", "EngineReplica")
        if all(s["running"] == 0 and not any(s["pages_in_use"].values()) for s in stats) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert all(s["running"] == 0 and not any(s["pages_in_use"].values()) for s in stats), stats


def test_a_replica_killed_mid_stream_ends_that_request_with_an_error_and_serving_goes_on(server):
    import time

    import ray

    body = {"model": "tiny", "prompt": "a long answer please", "max_tokens": 3000, "temperature": 0,
            "stream": True}
    with requests.post(server + "/v1/completions", json=body, stream=True, timeout=120) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith(b"data:"))
        assert b"text_completion" in first
        replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if "EngineReplica" in a["name"] and "v4serve#" in a["name"]]
        assert replicas
        for a in replicas:  # the one serving this stream is among them
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
        rest = [line for line in lines if line.startswith(b"data:")]
    assert any(b'"error"' in line for line in rest), rest[-3:]
    deadline = time.time() + 120
    while True:  # Serve replaces the replicas; new requests are served again
        ok = requests.post(server + "/v1/completions", json={"model": "tiny", "prompt": "again", "max_tokens": 3},
                           timeout=120)
        if ok.status_code == 200 or time.time() > deadline:
            break
        time.sleep(1)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
