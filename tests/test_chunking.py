"""Chunked prefill + decode equals a one-shot forward, bit for bit (float32, CPU)."""

import pytest
import torch

from model_configs import TINY
from workers.init import random_weights
from workers.model import V4Model

LENGTHS = [1, 3, 4, 5, 127, 128, 129, 255, 256, 257, 700]
CHUNKS = [1, 7, 128, 256]
DECODE_STEPS = 3


@pytest.fixture(scope="module")
def model():
    return V4Model(TINY).load_weights(random_weights(TINY, seed=0))


def prompt(n: int) -> list[int]:
    return torch.randint(2, TINY.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()


def run(model, ids, chunk, rounding=False):
    """Prefill in chunks, then greedy-decode DECODE_STEPS tokens; returns all logits [n+steps, V]."""
    model.rounding = rounding
    state = model.new_state()
    rows = [model([(state, ids[i : i + chunk])], all_logits=True)[0] for i in range(0, len(ids), chunk)]
    for _ in range(DECODE_STEPS):
        rows.append(model([(state, [int(rows[-1][-1].argmax())])], all_logits=True)[0])
    model.rounding = False
    return torch.cat(rows), state


@pytest.mark.parametrize("n", LENGTHS)
def test_chunked_prefill_then_decode_is_bit_identical_to_one_shot(model, n):
    ids = prompt(n)
    whole, whole_state = run(model, ids, n)
    for chunk in CHUNKS:
        if chunk >= n:
            continue
        got, state = run(model, ids, chunk)
        assert torch.equal(got, whole), f"chunk {chunk}: max diff {(got - whole).abs().max():.3e}"
        assert state.num_tokens == whole_state.num_tokens == n + DECODE_STEPS


@pytest.mark.parametrize("n", [129, 257])
def test_reference_rounding_is_also_chunk_invariant_and_changes_the_numbers(model, n):
    ids = prompt(n)
    whole, _ = run(model, ids, n, rounding=True)
    got, _ = run(model, ids, 7, rounding=True)
    assert torch.equal(got, whole)
    plain, _ = run(model, ids, n)
    assert not torch.equal(plain, whole)


def test_a_request_batched_with_others_gets_the_same_logits_as_alone(model):
    a, b, c = prompt(300), prompt(129), prompt(5)
    alone = [model([(model.new_state(), ids)], all_logits=True)[0] for ids in (a, b, c)]
    states = [model.new_state() for _ in range(3)]
    together = model([(states[0], a), (states[1], b), (states[2], c)], all_logits=True)
    for x, y in zip(alone, together):
        assert torch.equal(x, y)
    # and a decode step batched with a prefill chunk of another request
    s1, s2 = model.new_state(), model.new_state()
    model([(s1, a)])
    solo = model([(s1, [42])])[0]
    s1b, s2b = model.new_state(), model.new_state()
    model([(s1b, a)])
    mixed = model([(s1b, [42]), (s2b, b)])[0]
    assert torch.equal(solo, mixed)
