"""The decode step's batched state writes (workers/paged_state.py) leave the pools exactly as the
per-request writes they replace: the window key of one token per request (push_decode_keys vs
push_window) and a token appended to an open compressor window (append_open_rows vs
Compressor.forward)."""

import pytest
import torch

from model_configs import TINY
from workers.compressor import Compressor
from workers.config import CSA, HCA
from workers.paged_state import PagedRequestState, append_open_rows, push_decode_keys
from workers.pools import KVPools, size_pools
from workers.rope import inv_freq

POSITIONS = [300, 40, 129, 7]  # decode positions of four requests (window pages differ in offset)


def requests(pools):
    out = []
    for p in POSITIONS:
        st = PagedRequestState(pools)
        st.reserve(p + 1)
        st.num_tokens = p  # the token at position p is the one being decoded
        out.append(st)
    return out


def pool_set():
    return KVPools(TINY, size_pools(TINY, 16 << 20, "recompute", len(POSITIONS), layout="compact"), "compact")


def test_push_decode_keys_writes_what_push_window_writes():
    keys = torch.randn(len(POSITIONS), TINY.head_dim, generator=torch.Generator().manual_seed(0))
    layer = 1
    a, b = pool_set(), pool_set()
    for i, st in enumerate(requests(a)):
        st.layers[layer].push_window(keys[i : i + 1], TINY.sliding_window)
    push_decode_keys([st.layers[layer] for st in requests(b)], keys)
    assert a.swa.any() and torch.equal(a.swa, b.swa)


@pytest.mark.parametrize("ratio", [CSA, HCA])
def test_append_open_rows_leaves_the_slots_as_the_compressor_does(ratio):
    layer = TINY.compress_ratios.index(ratio)
    comp = Compressor(TINY.hidden_size, TINY.head_dim, ratio, TINY.rms_norm_eps)
    g = torch.Generator().manual_seed(1)
    for p in comp.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    freqs = inv_freq(TINY, True)
    a, b = pool_set(), pool_set()
    ra, rb = requests(a), requests(b)
    # bring every slot to a few open rows (fewer than ratio - 1, so the next token does not close)
    for st_a, st_b in zip(ra, rb):
        x = torch.randn(ratio - 2, TINY.hidden_size, generator=g)
        for st in (st_a, st_b):
            comp(x, 0, st.layers[layer].compressors["main"], freqs, None)
    x = torch.randn(len(POSITIONS), TINY.hidden_size, generator=g)
    pos = torch.full((len(POSITIONS),), ratio - 2)
    kv, score = comp.project(x, pos)
    for i, st in enumerate(ra):
        comp(x[i : i + 1], ratio - 2, st.layers[layer].compressors["main"], freqs, None,
             projected=(kv[i : i + 1], score[i : i + 1]))
    append_open_rows(b.comp, [st.layers[layer].compressors["main"] for st in rb], kv, score)
    assert torch.equal(a.comp, b.comp)
    assert [st.layers[layer].compressors["main"].n_open for st in rb] == [ratio - 1] * len(POSITIONS)


def test_append_open_rows_refuses_a_token_that_closes_a_window():
    layer = TINY.compress_ratios.index(CSA)
    pools = pool_set()
    st = requests(pools)[0]
    sc = st.layers[layer].compressors["main"]
    sc.n_open = CSA - 1
    with pytest.raises(AssertionError, match="closing window"):
        append_open_rows(pools.comp, [sc], torch.zeros(1, sc.row_width), torch.zeros(1, sc.row_width))
