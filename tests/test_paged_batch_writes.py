"""The decode step's batched state writes (workers/paged_state.py) leave the pools exactly as the
per-request writes they replace: the window key of one token per request (push_decode_keys vs
push_window), a token appended to an open compressor window (append_open_rows vs
Compressor.forward), windows closed together, and a graphed step's planned compressor update
(compress_plan and what reads it) against the compressor."""

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


def twin_requests(ratio, seed, fed):
    """A seeded compressor of `ratio` and two identical pool sets of requests whose main
    compressor slot (of the first layer of that ratio) has been fed the same `fed` tokens each."""
    layer = TINY.compress_ratios.index(ratio)
    comp = Compressor(TINY.hidden_size, TINY.head_dim, ratio, TINY.rms_norm_eps)
    g = torch.Generator().manual_seed(seed)
    for p in comp.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    freqs = inv_freq(TINY, True)
    twins = [(pools, requests(pools)) for pools in (pool_set(), pool_set())]
    for st_a, st_b in zip(twins[0][1], twins[1][1]):
        x = torch.randn(fed, TINY.hidden_size, generator=g)
        for st in (st_a, st_b):
            comp(x, 0, st.layers[layer].compressors["main"], freqs, None)
    return layer, comp, freqs, g, twins[0], twins[1]


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
    # every slot a few open rows (fewer than ratio - 1, so the next token does not close)
    layer, comp, freqs, g, (a, ra), (b, rb) = twin_requests(ratio, seed=1, fed=ratio - 2)
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


@pytest.mark.parametrize("ratio", [CSA, HCA])
@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_closing_windows_together_gives_the_compressor_entries_and_state(monkeypatch, ratio, mode):
    """close_windows + pool_closing + finish for four requests at once = Compressor.forward of
    the closing token request by request: the same entries, bit for bit, and the same slots."""
    from workers.paged_state import close_windows

    monkeypatch.setenv("V4SERVE_KERNELS", mode)
    done = 2 * ratio - 1 if ratio == CSA else ratio - 1  # CSA: past window 0, so an overlap is held
    layer, comp, freqs, g, (a, ra), (b, rb) = twin_requests(ratio, seed=2, fed=done)
    x = torch.randn(len(POSITIONS), TINY.hidden_size, generator=g)
    kv, score = comp.project(x, torch.full((len(POSITIONS),), done))
    want = torch.cat([comp(x[i : i + 1], done, st.layers[layer].compressors["main"], freqs, "main",
                           projected=(kv[i : i + 1], score[i : i + 1])) for i, st in enumerate(ra)])
    slots = [st.layers[layer].compressors["main"] for st in rb]
    got = comp.finish(comp.pool_closing(*close_windows(b.comp, slots, kv, score)),
                      torch.full((len(POSITIONS),), done // ratio), freqs, "main")
    assert want.shape == (len(POSITIONS), TINY.head_dim)
    assert torch.equal(got, want)
    assert torch.equal(a.comp, b.comp)
    assert [sc.n_open for sc in slots] == [0] * len(POSITIONS)


@pytest.mark.parametrize("family", ["main", "index"])
def test_append_decode_entries_writes_what_append_entries_writes(family):
    from workers.paged_state import append_decode_entries

    layer = TINY.compress_ratios.index(CSA)
    width = TINY.head_dim if family == "main" else TINY.index_head_dim
    rows = torch.randn(len(POSITIONS), width, generator=torch.Generator().manual_seed(3))
    a, b = pool_set(), pool_set()
    ra, rb = requests(a), requests(b)
    for st_a, st_b, p in zip(ra, rb, POSITIONS):  # entries already held: the new one lands mid-page
        for st in (st_a, st_b):
            st.layers[layer].count[family] = p // CSA
    for i, st in enumerate(ra):
        st.layers[layer].append_entries(family, rows[i : i + 1])
    append_decode_entries([st.layers[layer] for st in rb], family, rows)
    store = a.csa_main if family == "main" else a.csa_index
    assert store.any() and torch.equal(store, b.csa_main if family == "main" else b.csa_index)
    assert [st.layers[layer].count[family] for st in rb] == [p // CSA + 1 for p in POSITIONS]


@pytest.mark.parametrize("ratio", [CSA, HCA])
@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_a_planned_compressor_update_gives_the_compressor_entries_and_state(monkeypatch, ratio, mode):
    """A graphed step's compressor update (compress_plan, write_open_rows, planned_windows,
    finish, then write_planned_entries and advance_compressors) for four requests, two closing a window and
    two not, padded to 6 rows = Compressor.forward request by request: the closing rows' entries
    bit for bit, written where append_entries puts them, and the same open rows and overlaps."""
    from workers.paged_state import (PLAN_INDEX, PLAN_OPEN, advance_compressors, compress_plan, planned_windows,
                                     write_open_rows, write_planned_entries)

    monkeypatch.setenv("V4SERVE_KERNELS", mode)
    # tokens already fed; CSA windows close past window 0 only (with an overlap); all in block 0
    fed = [2 * ratio - 1, 2 * ratio - 2, ratio + 1, 3 * ratio - 1 if ratio == CSA else ratio - 1]
    layer = TINY.compress_ratios.index(ratio)
    comp = Compressor(TINY.hidden_size, TINY.head_dim, ratio, TINY.rms_norm_eps)
    g = torch.Generator().manual_seed(4)
    for p in comp.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.1
    freqs = inv_freq(TINY, True)
    (a, ra), (b, rb) = [(pools, requests(pools)) for pools in (pool_set(), pool_set())]
    for i, n in enumerate(fed):
        x = torch.randn(n, TINY.hidden_size, generator=g)
        for st in (ra[i], rb[i]):
            st.num_tokens = n
            comp(x, 0, st.layers[layer].compressors["main"], freqs, None)
            st.layers[layer].count["main"] = n // ratio
    x = torch.randn(len(fed), TINY.hidden_size, generator=g)
    kv, score = comp.project(x, torch.tensor(fed))
    closing = [i for i, n in enumerate(fed) if n % ratio == ratio - 1]
    for i, st in enumerate(ra):
        new = comp(x[i : i + 1], fed[i], st.layers[layer].compressors["main"], freqs, "main",
                   projected=(kv[i : i + 1], score[i : i + 1]))
        assert new.shape[0] == (i in closing)
        st.layers[layer].append_entries("main", new)
    states = [st.layers[layer] for st in rb]
    plan = torch.tensor(compress_plan(states, "main", 6))
    src = torch.tensor(list(range(len(fed))) + [0, 0])
    slot = states[0].compressors["main"]
    write_open_rows(b.comp, plan[PLAN_OPEN], kv[src], score[src], slot)
    windows = planned_windows(b.comp, plan, slot)
    got = comp.finish(comp.pool_closing(*windows), plan[PLAN_INDEX], freqs, "main")
    write_planned_entries(states[0], "main", plan, got)
    advance_compressors(states, "main")
    for st_a, st_b in zip(ra, rb):
        sa, sb = st_a.layers[layer], st_b.layers[layer]
        assert sa.count == sb.count
        assert torch.equal(sa.entries("main"), sb.entries("main"))
        ca, cb = sa.compressors["main"], sb.compressors["main"]
        assert (ca.n_open, ca.has_overlap) == (cb.n_open, cb.has_overlap)
        assert torch.equal(ca.open_kv, cb.open_kv) and torch.equal(ca.open_score, cb.open_score)
        if ca.has_overlap:
            assert torch.equal(ca.overlap_kv, cb.overlap_kv) and torch.equal(ca.overlap_score, cb.overlap_score)
    assert len(closing) == 2 and all(rb[i].layers[layer].count["main"] == fed[i] // ratio + 1 for i in closing)
