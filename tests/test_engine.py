"""The engine (paged state, continuous batching, chunked prefill, prefix cache, preemption) gives
every request the tokens the monolithic model gives it alone."""

import pytest
import torch

from model_configs import TINY
from workers.engine import Engine, EngineConfig, EngineInputError
from workers.generate import generate_ids
from workers.init import random_weights
from workers.model import V4Model
from workers.pools import BLOCK, page_bytes
from workers.sampling import SamplingParams
from workers.tokenizer import Tokenizer, build_byte_tokenizer

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
POLICIES = ["full_store", "checkpoint", "recompute"]


@pytest.fixture(scope="module")
def model():
    return V4Model(TINY).load_weights(random_weights(TINY, seed=0))


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, prompt, params=GREEDY) -> list[int]:
    return [s.token_id for s in generate_ids(model, prompt, params)]


def engine(model, **kw) -> Engine:
    kw.setdefault("budget_bytes", 48 << 20)
    kw.setdefault("max_requests", 8)
    kw.setdefault("layout", "float")  # exact for the transformers-parity numerics these tests use
    return Engine(model, EngineConfig(**kw))


def assert_idle(eng: Engine) -> None:
    """Every page is free or held by the prefix cache alone (exactly one reference)."""
    cache_refs = {"blocks": {}, "swa": {}, "overlap": {}}
    for blk in (eng.cache.blocks.values() if eng.cache else []):
        cache_refs["blocks"][blk.page] = 1
        for p in blk.window.values():
            cache_refs["swa"][p] = cache_refs["swa"].get(p, 0) + 1
        if blk.overlap is not None:
            cache_refs["overlap"][blk.overlap] = 1
    for pool in eng.pools.all_pools():
        want = cache_refs.get(pool.name, {})
        assert [pool.refs[p] for p in range(pool.num_pages)] == [want.get(p, 0) for p in range(pool.num_pages)], pool.name
    assert not eng.running and not eng.waiting


def test_ten_batched_requests_get_the_tokens_each_gets_alone(model):
    prompts = [tokens(n, i) for i, n in enumerate([1, 5, 127, 128, 129, 300, 513, 700, 40, 256])]
    eng = engine(model, max_batch_tokens=768)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    out = eng.run()
    assert [out[i] for i in ids] == [alone(model, p) for p in prompts]
    assert eng.stats.steps < sum(len(p) for p in prompts)  # they really shared forwards
    assert_idle(eng)


def assert_batched_equals_alone(model, prompts, params):
    eng = engine(model)
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    out = eng.run()
    assert [out[i] for i in ids] == [alone(model, p, sp) for p, sp in zip(prompts, params)]
    assert_idle(eng)


def test_seeded_sampling_batched_equals_alone(model):
    prompts = [tokens(n, 50 + n) for n in (10, 200, 400, 33)]
    assert_batched_equals_alone(model, prompts, [
        SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=s, ignore_eos=True)
        for s in range(len(prompts))])


def test_greedy_and_sampled_requests_in_one_batch_get_their_tokens_alone(model):
    """Greedy requests take one batched argmax per step, the others their own draws: mixed in
    one batch, each gets what it gets alone."""
    assert_batched_equals_alone(model, [tokens(n, 70 + n) for n in (12, 150, 301, 7)], [
        GREEDY, SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True), GREEDY,
        SamplingParams(max_tokens=8, temperature=1.2, top_k=20, seed=4, ignore_eos=True)])


def test_batched_greedy_picks_the_first_of_tied_maxima(model):
    eng = engine(model)
    rows = torch.randn(5, TINY.vocab_size)
    rows[1, [3, 200]] = rows[1].max() + 1  # a tie: index 3 wins, as argmax of the row alone
    rows[4, [250, 7]] = 1e9
    seqs = [type("Seq", (), {"params": GREEDY, "generator": None})() for _ in rows]
    picked = eng._sample_tokens(list(zip(seqs, rows)))
    assert picked == [int(r.argmax()) for r in rows] and picked[1] == 3 and picked[4] == 7


@pytest.mark.parametrize("policy", POLICIES)
def test_prefix_hits_give_the_cold_tokens_on_and_off_boundaries(model, policy):
    shared = tokens(1300, 7)
    eng = engine(model, policy=policy, checkpoint_interval=2)
    warm = eng.add_request(shared + tokens(9, 8), GREEDY)
    assert eng.run()[warm] == alone(model, shared + tokens(9, 8))
    # matched lengths: 1280 (block, off checkpoint), 1024 (block and checkpoint), 768 from a 900 prefix
    cases = [shared + tokens(20, 9), shared[:1024] + tokens(3, 10), shared[:900] + tokens(50, 11), shared[:1025]]
    for prompt in cases:
        before = eng.cache.stats.hit_tokens
        rid = eng.add_request(prompt, GREEDY)
        assert eng.run()[rid] == alone(model, prompt)
        matched = min(len(prompt) - 1, 1300) // BLOCK * BLOCK
        assert eng.cache.stats.hit_tokens - before == matched
    if policy == "full_store":
        assert eng.cache.stats.recomputed_tokens == 0
    if policy == "recompute":
        assert eng.cache.held_bytes()["window_bytes"] == 0 and eng.cache.stats.recomputed_tokens > 0
    assert_idle(eng)


@pytest.mark.parametrize("policy", POLICIES)
def test_requests_sharing_a_cached_prefix_run_together_and_match_alone(model, policy):
    shared = tokens(800, 21)
    eng = engine(model, policy=policy, checkpoint_interval=1)
    eng.add_request(shared + [5], GREEDY)
    eng.run()
    prompts = [shared + tokens(n, 30 + n) for n in (1, 60, 300, 2)]
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    eng.step()
    assert len(eng.running) == len(prompts)  # admitted together, all on the shared pages
    shared_page = eng.running[0].state.blocks[0]
    assert all(s.state.blocks[0] == shared_page for s in eng.running)
    out = eng.run()
    assert [out[i] for i in ids] == [alone(model, p) for p in prompts]
    assert_idle(eng)


def test_pool_exhaustion_preempts_and_still_completes_every_request(model):
    prompts = [tokens(n, 70 + n) for n in (600, 500, 700, 650, 300, 550)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    pb = page_bytes(TINY, "float")
    fixed = 6 * (pb["comp"] + 6 * pb["swa"])
    eng = engine(model, budget_bytes=fixed + 8 * pb["blocks"], max_requests=6, prefix_cache=False)
    assert eng.pools.sizes.blocks == 8 < sum(-(-(len(p) + 40) // BLOCK) for p in prompts)
    ids = [eng.add_request(p, params) for p in prompts]
    out = eng.run()
    assert [out[i] for i in ids] == [alone(model, p, params) for p in prompts]
    assert eng.stats.preemptions > 0
    assert_idle(eng)


def test_cancelling_a_request_frees_its_pages_at_once(model):
    eng = engine(model, prefix_cache=False)
    keep = eng.add_request(tokens(300, 1), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    drop = eng.add_request(tokens(600, 2), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    eng.step()
    used = eng.pages_in_use()
    assert eng.abort(drop)
    after = eng.pages_in_use()
    assert after["blocks"] < used["blocks"] and after["comp"] == used["comp"] - 1
    assert not eng.abort(drop)
    assert eng.run()[keep] == alone(model, tokens(300, 1), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert eng.seqs[drop].finish_reason == "abort"
    assert_idle(eng)


def test_tokens_stream_one_step_at_a_time_with_finish_reasons(model):
    tok = Tokenizer(build_byte_tokenizer(), TINY)
    eng = Engine(model, EngineConfig(budget_bytes=16 << 20, max_requests=4, layout="float"), tokenizer=tok)
    prompt = tokens(50, 3)
    want = alone(model, prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    a = eng.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    b = eng.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(want[3],), ignore_eos=True))
    stop_text = tok.decode(want[5:7])
    c = eng.add_request(prompt, SamplingParams(max_tokens=12, temperature=0, stop=(stop_text,), ignore_eos=True))
    streamed = {a: [], b: [], c: []}
    finished = {}
    while eng.has_unfinished():
        for o in eng.step():
            assert len(o.new_token_ids) == 1
            streamed[o.request_id] += o.new_token_ids
            if o.finished:
                finished[o.request_id] = o.finish_reason
    assert streamed[a] == want and finished[a] == "length"
    assert streamed[b] == want[: want.index(want[3]) + 1] and finished[b] == "stop"
    assert finished[c] == "stop" and stop_text not in eng.seqs[c].text
    assert_idle(eng)


@pytest.mark.parametrize("prompt, params, message", [
    ([], {}, "prompt is empty"),
    ([5] * 3000, {}, "context limit"),
    ([5] * 10, {"max_tokens": 2500}, "max_tokens=2500 exceeds"),
    ([5] * 10, {"temperature": -1.0}, "temperature"),
    ([5] * 10, {"top_p": 0.0}, "top_p"),
    ([5] * 10, {"top_p": 1.5}, "top_p"),
    ([999], {}, "outside"),
])
def test_bad_requests_are_rejected_before_any_page_is_taken(model, prompt, params, message):
    eng = engine(model, max_model_len=2048)
    with pytest.raises(EngineInputError, match=message):
        eng.add_request(prompt, params)
    assert not eng.waiting and all(p.num_free == p.num_pages for p in eng.pools.all_pools())


def test_compact_layout_with_reference_rounding_is_exact(model):
    """584-byte FP8+BF16 entries and 68-byte FP4 indexer keys store the reference-rounded values
    exactly, so the paged engine equals the monolithic model in reference-rounding mode."""
    model.rounding = True
    try:
        prompts = [tokens(n, 90 + n) for n in (700, 129, 1)]
        eng = engine(model, layout="compact", policy="recompute")
        ids = [eng.add_request(p, GREEDY) for p in prompts]
        out = eng.run()
        assert [out[i] for i in ids] == [alone(model, p) for p in prompts]
        hit = eng.add_request(prompts[0][:600] + [7, 8], GREEDY)
        assert eng.run()[hit] == alone(model, prompts[0][:600] + [7, 8])
        assert eng.pools.csa_main.dtype == torch.uint8
        assert_idle(eng)
    finally:
        model.rounding = False


def test_hit_accounting_counts_admitted_hits_once(model):
    eng = engine(model, policy="full_store")
    shared = tokens(600, 40)
    eng.add_request(shared + [3], GREEDY)
    eng.run()
    eng.add_request(shared + [4], GREEDY)
    eng.run()
    assert eng.cache.stats.hit_tokens == 512 and eng.cache.stats.recomputed_tokens == 0
    held = eng.cache.held_bytes()
    assert held["window_bytes"] > 0 and held["overlap_bytes"] > 0
    assert_idle(eng)


def test_the_compact_layout_refuses_a_model_without_reference_rounding(model):
    with pytest.raises(ValueError, match="rounding=True"):
        Engine(model, EngineConfig(layout="compact"))


def test_a_request_waits_for_a_running_prefill_of_its_prefix_instead_of_duplicating_it(model):
    shared = tokens(1100, 61)
    eng = engine(model, policy="checkpoint", max_batch_tokens=256, prefill_chunk=256)
    first = eng.add_request(shared + [1], GREEDY)
    eng.step()  # the first request is prefilling the shared blocks
    second = eng.add_request(shared + [2], GREEDY)
    out = eng.run()
    assert eng.seqs[second].cached == 1024  # it waited, then hit every full shared block
    assert out[first] == alone(model, shared + [1]) and out[second] == alone(model, shared + [2])
    assert_idle(eng)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_prefill_on_one_engine_and_decode_on_another_equals_one_engine(model, params):
    """The disaggregated path inside one process: prefill-only on engine A, the state exported
    layer by layer and imported into engine B's pages, decoding on B."""
    prompts = [tokens(n, 80 + n) for n in (700, 129, 5, 256)]
    prefill, decode = engine(model), engine(model)
    got = {}
    for p in prompts:
        rid = prefill.add_prefill(p, params)
        first = prefill.run()[rid][0]
        assert prefill.seqs[rid].finish_reason == "prefilled"
        state, gen = prefill.take_handoff(rid)
        landing = decode.new_import_state(state.num_tokens)
        for layer in range(TINY.num_hidden_layers):
            for name, t in state.export_layer(layer):
                kind, _, family = name.partition(".")
                landing.import_piece(layer, kind, family, 0, t)
        state.free()
        out = decode.add_imported(p, params, first, landing, generator=gen)
        assert out.new_token_ids == [first]
        got[out.request_id] = p
    outs = decode.run()
    assert [outs[rid] for rid in got] == [alone(model, p, params) for p in got.values()]
    assert_idle(prefill)
    assert_idle(decode)


def test_a_stream_closed_by_its_caller_aborts_the_request_and_frees_its_pages(model):
    import asyncio

    from workers.async_engine import AsyncEngine

    eng = engine(model, prefix_cache=False)
    front = AsyncEngine(eng)

    async def run():
        stream = front.generate(tokens(400, 5), SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
        async for _ in stream:
            break  # the client goes away after its first token
        await stream.aclose()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not eng.running and not eng.waiting:
                break

    asyncio.run(run())
    assert_idle(eng)
