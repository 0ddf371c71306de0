"""Rebuilding the window state of a cached prefix by replay is exact (the `recompute` policy).

The compressed entries of a prefix are cached; its sliding-window keys and compressor partial
state are not derivable from them. Replaying the last 127 * num_layers tokens with the entries
frozen recomputes them exactly (v4-architecture.md §8.2): the continuation is bit-identical.
"""

import pytest
import torch

from model_configs import TINY
from workers.init import random_weights
from workers.model import V4Model


@pytest.fixture(scope="module")
def model():
    return V4Model(TINY).load_weights(random_weights(TINY, seed=0))


def state_with_cached_entries(model, cold, upto: int, start: int):
    """A fresh state at position `start` holding only `cold`'s compressed entries below `upto`."""
    st = model.new_state()
    for ls, src, ratio in zip(st.layers, cold.layers, TINY.compress_ratios):
        for fam in src.families():
            ls.append_entries(fam, src.entries(fam)[: upto // ratio])
    st.num_tokens, st.replay_end = start, upto
    return st


@pytest.mark.parametrize("matched, tail", [(768, 40), (1024, 1), (256, 100), (640, 9)])
def test_replay_of_the_receptive_field_continues_bit_identically(model, matched, tail):
    ids = torch.randint(2, 258, (matched + tail,), generator=torch.Generator().manual_seed(matched)).tolist()
    cold = model.new_state()
    want = model([(cold, ids)], all_logits=True)[0][matched:]
    reach = 127 * TINY.num_hidden_layers
    start = max(0, matched - reach)
    st = state_with_cached_entries(model, cold, matched, start)
    model([(st, ids[start:matched])])
    assert st.num_tokens == matched and st.replay_end is None
    got = model([(st, ids[matched:])], all_logits=True)[0]
    assert torch.equal(got, want)


def test_a_replay_shorter_than_the_receptive_field_is_not_exact(model):
    """The test above would pass vacuously if the window state did not matter."""
    matched, tail = 1024, 20
    ids = torch.randint(2, 258, (matched + tail,), generator=torch.Generator().manual_seed(5)).tolist()
    cold = model.new_state()
    want = model([(cold, ids)], all_logits=True)[0][matched:]
    start = matched - 127 * (TINY.num_hidden_layers - 2)
    st = state_with_cached_entries(model, cold, matched, start)
    model([(st, ids[start:matched])])
    got = model([(st, ids[matched:])], all_logits=True)[0]
    assert not torch.equal(got, want)
