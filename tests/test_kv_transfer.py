"""Prefill in one process, transfer the state over a gloo pair channel, decode in another."""

import multiprocessing as mp
import socket

import pytest
import torch

import transfer_peers
from model_configs import TINY
from workers.capacity import indexer_entry_bytes, main_entry_bytes
from workers.config import CSA, HCA
from workers.generate import generate_ids
from workers.init import random_weights
from workers.model import V4Model
from workers.sampling import SamplingParams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec_bytes(cfg, P: int) -> int:
    """v4-architecture.md §7: compressed entries + window tail + compressor partial state."""
    main, idx, W = main_entry_bytes(cfg), indexer_entry_bytes(cfg), cfg.sliding_window
    total = cfg.num_hidden_layers * min(P, W - 1) * main
    for r in cfg.compress_ratios:
        if r == CSA:
            total += (P // 4) * (main + idx)
            for width in (cfg.head_dim, cfg.index_head_dim):
                total += (P % 4) * 2 * width * 4 * 2  # open tokens, both halves, kv + score
                total += (4 * width * 4 * 2) if P >= 4 else 0  # overlap A-halves, kv + score
        elif r == HCA:
            total += (P // 128) * main + (P % 128) * cfg.head_dim * 4 * 2
    return total


def run_pair(target_a, args_a, target_b, args_b, n_messages=2, timeout=180):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target_a, args=(*args_a, q)), ctx.Process(target=target_b, args=(*args_b, q))]
    for p in procs:
        p.start()
    try:
        messages = [q.get(timeout=timeout) for _ in range(n_messages)]
        return {m[0]: m[1:] for m in messages}
    finally:
        for p in procs:
            p.kill()
            p.join(10)


@pytest.mark.parametrize("P", [701, 130])
def test_state_sent_over_the_channel_continues_exactly_and_weighs_what_the_spec_says(P):
    prompt = torch.randint(2, 258, (P,), generator=torch.Generator().manual_seed(P)).tolist()
    model = V4Model(TINY, rounding=True).load_weights(random_weights(TINY, 0))
    want = [s.token_id for s in generate_ids(model, prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]
    port = free_port()
    got = run_pair(transfer_peers.prefill_and_send, (port, prompt), transfer_peers.receive_and_decode, (port, P, 6))
    assert "decode" in got, got
    assert got["decode"][0] == want
    assert got["prefill"][0] == spec_bytes(TINY, P)


def test_a_silent_sender_times_out_and_the_receiver_frees_its_pages():
    port = free_port()
    got = run_pair(transfer_peers.silent_sender, (port,), transfer_peers.receive_and_decode, (port, 300, 1),
                   n_messages=2)
    assert "error" in got, got
    message, pages_free = got["error"]
    assert "receive failed" in message and pages_free


# ---- streamed transfer: frames while the prefill runs, one receive loop, reservations ----------

def open_pair(timeout_s: float = 30):
    """Both ends of a pair channel in this process (each side's constructor waits for the other)."""
    from concurrent.futures import ThreadPoolExecutor

    from kv_transfer import PairChannel

    port = free_port()
    with ThreadPoolExecutor(2) as ex:
        send_end = ex.submit(PairChannel, "127.0.0.1", port, 0, timeout_s)
        recv_end = ex.submit(PairChannel, "127.0.0.1", port, 1, timeout_s)
        return send_end.result(), recv_end.result()



def test_joining_is_bounded_by_the_open_time_out_and_each_operation_by_the_shorter_one():
    """A peer that is still starting joins late: the channel waits open_timeout_s for it, while
    each operation after that is bounded by timeout_s; without open_timeout_s, timeout_s bounds the
    join too (nobody hosting: a TransferError after it)."""
    import threading
    import time

    from kv_transfer import PairChannel, TransferError

    port, hosts = free_port(), []

    def late_host():
        time.sleep(2)
        hosts.append(PairChannel("127.0.0.1", port, 0, timeout_s=30))

    t = threading.Thread(target=late_host)
    t.start()
    ch = PairChannel("127.0.0.1", port, 1, timeout_s=0.5, open_timeout_s=30)
    t.join()
    start = time.monotonic()
    with pytest.raises(TransferError, match="receive failed|no progress"):
        ch.recv()  # the host sends nothing
    assert time.monotonic() - start < 10
    ch.close()
    hosts[0].close()
    start = time.monotonic()
    with pytest.raises(TransferError, match="cannot open channel"):
        PairChannel("127.0.0.1", free_port(), 1, timeout_s=0.5)
    assert time.monotonic() - start < 10

@pytest.fixture(scope="module")
def streaming():
    """A rounding model, a sender and a landing joined by one channel (its receive loop running)."""
    import threading

    from kv_transfer import ChannelSender, Landing

    model = V4Model(TINY, rounding=True).load_weights(random_weights(TINY, 0))
    send_end, recv_end = open_pair()
    landing = Landing()
    threading.Thread(target=landing.serve, args=(recv_end,), daemon=True).start()
    return model, ChannelSender(send_end), landing


def engine(model, **kw):
    from workers.engine import Engine, EngineConfig

    return Engine(model, EngineConfig(budget_bytes=24 << 20, max_requests=4, prefill_chunk=256,
                                      max_batch_tokens=256, **kw))


def all_free(eng) -> bool:
    return all(p.num_free == p.num_pages for p in eng.pools.all_pools())


def test_a_state_streamed_during_a_chunked_prefill_lands_whole_and_decodes_exactly(streaming):
    from kv_transfer import StateStream

    model, sender, landing = streaming
    P = 901
    prompt = torch.randint(2, 258, (P,), generator=torch.Generator().manual_seed(7)).tolist()
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prefill, decode = engine(model, prefix_cache=False), engine(model, prefix_cache=False)
    landed = decode.new_import_state(P)
    receipt = landing.expect("stream-1", landed, 30, on_failure=lambda s: None)
    stream, during = StateStream("stream-1", "cpu"), []

    def on_chunk(state):
        frame = stream.ready_frame(state)
        if frame is not None:
            during.append(sender.submit(frame))

    rid = prefill.add_prefill(prompt, greedy, on_chunk=on_chunk)
    first = prefill.run()[rid][0]
    assert len(during) == 3  # chunks 1-3 of 4 left before the prefill ended
    state, _ = prefill.take_handoff(rid)
    for frame in stream.last_frames(state, {"first_token": first}):
        sender.submit(frame).result(timeout=30)
    assert receipt.result(timeout=30)["first_token"] == first
    for layer in range(TINY.num_hidden_layers):  # the receiver holds what the sender held, per family
        sent, got = dict(state.export_layer(layer)), dict(landed.export_layer(layer))
        assert sent.keys() == got.keys()
        for family in sent:
            assert torch.equal(sent[family], got[family]), (layer, family)
    assert stream.bytes == spec_bytes(TINY, P)  # streaming adds no byte to the spec's accounting
    state.free()
    decode.add_imported(prompt, greedy, first, landed, request_id="cont")
    want = [s.token_id for s in generate_ids(model, prompt, greedy)]
    assert decode.run()["cont"] == want
    assert all_free(prefill) and all_free(decode)


def test_a_reservation_whose_state_never_comes_times_out_and_frees_its_pages(streaming):
    model, _, landing = streaming
    decode = engine(model, prefix_cache=False)
    freed = []
    receipt = landing.expect("never", decode.new_import_state(700), 0.5, on_failure=lambda s: (s.free(), freed.append(s)))
    with pytest.raises(Exception, match="timed out"):
        receipt.result(timeout=10)
    assert len(freed) == 1 and all_free(decode)


def test_a_corrupt_frame_fails_its_request_frees_its_pages_and_the_channel_serves_the_next(streaming):
    from kv_transfer import StateStream

    model, sender, landing = streaming
    src, dst = engine(model, prefix_cache=False), engine(model, prefix_cache=False)
    prompt = [2 + i % 250 for i in range(300)]
    rid = src.add_prefill(prompt, SamplingParams(max_tokens=2, temperature=0))
    src.run()
    state, _ = src.take_handoff(rid)
    for ticket, corrupt in (("bad", True), ("good", False)):
        landed = dst.new_import_state(len(prompt))
        receipt = landing.expect(ticket, landed, 30, on_failure=lambda s: s.free())
        frames = StateStream(ticket, "cpu").last_frames(state)
        if corrupt:
            frames[0][1][5] ^= 0xFF  # one flipped byte in flight, after the checksum was taken
        for f in frames:
            sender.submit(f).result(timeout=30)
        if corrupt:
            with pytest.raises(Exception, match="checksum"):
                receipt.result(timeout=30)
            assert all_free(dst)
        else:
            assert receipt.result(timeout=30)["num_tokens"] == len(prompt)
            landed.free()
    state.free()


def test_a_transfer_to_a_dead_decode_replica_fails_and_the_prefill_side_frees_its_pages(streaming):
    import time

    from kv_transfer import ChannelSender, PairChannel, StateStream, TransferError, finish

    model = streaming[0]
    src = engine(model, prefix_cache=False)
    rid = src.add_prefill([2 + i % 250 for i in range(700)], SamplingParams(max_tokens=2, temperature=0))
    src.run()
    state, _ = src.take_handoff(rid)
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    peer = ctx.Process(target=transfer_peers.join_and_die, args=(port, q))
    peer.start()
    sender = ChannelSender(PairChannel("127.0.0.1", port, 0, timeout_s=5))
    assert q.get(timeout=60)[0] == "joined"
    peer.join(30)
    time.sleep(0.5)  # the connection's close reaches this side
    with pytest.raises(TransferError):
        finish(sender, StateStream("gone", "cpu"), state, [], None, lambda s: s.free())
    assert all_free(src) and sender.broken


@pytest.mark.parametrize("policy", ["checkpoint", "recompute"])
def test_a_prompt_that_hits_the_prefill_side_prefix_cache_streams_the_same_state(streaming, policy):
    """Entries attached from the cache go in the first frame; under `recompute` the window is
    replayed on the prefill side. The decode side must not be able to tell."""
    from kv_transfer import StateStream

    model, sender, landing = streaming
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    shared = torch.randint(2, 258, (768,), generator=torch.Generator().manual_seed(11)).tolist()
    prompt = shared + [5, 6, 7] * 40
    prefill, decode = engine(model, policy=policy), engine(model, prefix_cache=False)
    prefill.add_request(shared + [9], greedy, request_id="primer")
    prefill.run()
    landed = decode.new_import_state(len(prompt))
    receipt = landing.expect(f"hit-{policy}", landed, 30, on_failure=lambda s: None)
    stream = StateStream(f"hit-{policy}", "cpu")
    rid = prefill.add_prefill(prompt, greedy, on_chunk=lambda st: (f := stream.ready_frame(st)) and sender.submit(f))
    first = prefill.run()[rid][0]
    assert prefill.seqs[rid].cached >= 512  # it did hit
    state, _ = prefill.take_handoff(rid)
    for frame in stream.last_frames(state, {"first_token": first}):
        sender.submit(frame).result(timeout=30)
    receipt.result(timeout=30)
    state.free()
    decode.add_imported(prompt, greedy, first, landed, request_id="cont")
    assert decode.run()["cont"] == [s.token_id for s in generate_ids(model, prompt, greedy)]
