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
