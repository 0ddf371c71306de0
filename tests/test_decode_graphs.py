"""Decode steps through CUDA graphs of their state-free pieces (workers/decode_graphs.py).

A graphed step differs from an eager one in three ways, each checked here against the eager path:
rows padded to a bucket, the MoE's picks kept on the device (the picked experts' kernels, or
every expert on every row) and, on a GPU, replayed graphs. On the CPU the first two run without
graphs (DecodeGraphs(capture=False)) and must give the eager step's bits exactly; on a GPU the
replayed graphs must give the bits of the same pieces run eagerly.
"""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from model_configs import TINY, WIDE
from test_kernels_engine import paged_logits, prompts
from workers.config import CSA, ModelConfig, preset
from workers.decode_graphs import BUCKETS, DecodeGraphs, bucket, graphs_enabled
from workers.init import random_weights
from workers.model import V4Model
from workers.moe import MoE


def test_buckets_pad_up_and_stop_at_the_largest(monkeypatch):
    assert [bucket(n) for n in (1, 16, 17, 33, BUCKETS[-1])] == [16, 16, 32, 48, BUCKETS[-1]]
    assert bucket(BUCKETS[-1] + 1) is None
    monkeypatch.setenv("V4SERVE_CUDA_GRAPHS", "yes")
    with pytest.raises(ValueError, match="V4SERVE_CUDA_GRAPHS"):
        graphs_enabled()


def moe_layer(cfg, layer, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    moe = MoE(cfg, layer, dtype)
    for p in moe.parameters():
        p.data.normal_(0, 0.5)
    if moe.gate.hashed:  # token 7 sends both its slots to one expert: added twice, slot by slot
        moe.gate.tid2eid.copy_(torch.randint(0, cfg.n_routed_experts, moe.gate.tid2eid.shape))
        moe.gate.tid2eid[7] = 3
    return moe


@pytest.mark.parametrize("cfg,layer", [(TINY, 0), (TINY, 3), (WIDE, 0), (WIDE, 2)])
@pytest.mark.parametrize("kernels,dtype", [("torch", torch.float32), ("triton", torch.float32), ("triton", torch.bfloat16)])
def test_dense_moe_gives_the_routed_moe_bits(cfg, layer, kernels, dtype, monkeypatch):
    """Hash layers (token-id table) and top-k layers, 5 and 20 rows (below and above numerics'
    16-row padding): every expert on every row, weighted 0 where unpicked, adds the same bits as
    one expert at a time on the rows that picked it, with the references and with the kernels;
    and the MoE with its picks on the device (on the kernel path the picked experts' kernels)."""
    monkeypatch.setenv("V4SERVE_KERNELS", kernels)
    moe = moe_layer(cfg, layer, seed=layer, dtype=dtype)
    assert moe.gate.hashed == cfg.is_hash_layer(layer)
    for n in (5, 20):
        x = (torch.randn(n, cfg.hidden_size) * 3).to(dtype)
        ids = torch.randint(0, cfg.vocab_size, (n,))
        ids[0] = 7
        experts, weights = moe.gate(x, ids)
        routed = moe._routed(x, experts, weights)
        assert torch.equal(moe._routed_dense(x, experts, weights), routed)
        assert torch.equal(moe(x, ids, dense=True), routed + moe.shared_experts(x))


@pytest.mark.parametrize("layer", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_picked_experts_give_the_routed_moe_bits(layer, dtype, monkeypatch):
    """On the kernel path the MoE runs only the picked experts (kernels/picked_experts.py),
    graphed or eager, for 1 row, a few, and an MoE of more experts than could run dense (32, 12
    rows): _routed's bits. Layer 0 hashes, and token 7 sends both slots to one expert."""
    from kernels import picked_experts

    monkeypatch.setenv("V4SERVE_KERNELS", "triton")
    calls = []
    real = picked_experts.moe
    monkeypatch.setattr(picked_experts, "moe", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    many = ModelConfig(**{**TINY.model_dump(), "n_routed_experts": 32, "name": "many-experts"})
    for cfg, n in ((TINY, 1), (TINY, 4), (many, 12)):
        moe = moe_layer(cfg, layer, seed=n, dtype=dtype)
        x = (torch.randn(n, cfg.hidden_size) * 3).to(dtype)
        ids = torch.randint(0, cfg.vocab_size, (n,))
        ids[0] = 7
        experts, weights = moe.gate(x, ids)
        want = moe._routed(x, experts, weights) + moe.shared_experts(x)
        assert torch.equal(moe(x, ids, dense=True), want) and torch.equal(moe(x, ids), want)
    assert calls == [1, 1, 4, 4, 12, 12]


def test_models_route_on_the_device_where_a_graph_can(monkeypatch):
    """Graphs need the picks on the device: a few experts run dense anywhere; more need the
    picked experts' kernels, with a shared expert as wide as the routed ones and a decode
    bucket's picks within what their grouping program sorts (128 rows x 16 picks are not)."""
    from workers.moe import routes_on_device

    many = ModelConfig(**{**TINY.model_dump(), "n_routed_experts": 32, "name": "many-experts"})
    wide_shared = ModelConfig(**{**many.model_dump(), "n_shared_experts": 2, "name": "wide-shared"})
    many_picks = ModelConfig(**{**many.model_dump(), "num_experts_per_tok": 16, "name": "many-picks"})
    t = torch.zeros(1)
    monkeypatch.setenv("V4SERVE_KERNELS", "torch")
    assert routes_on_device(TINY, t) and not routes_on_device(many, t)
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")
    assert routes_on_device(many, t) and not routes_on_device(wide_shared, t) and not routes_on_device(many_picks, t)


def test_moe_experts_stay_views_of_their_stacks_through_moves_and_loads(monkeypatch):
    """The picked experts' kernels read the stacks: a dtype move re-ties them, a copy into an
    expert's weight shows in its stack, and a weight replaced outright makes the MoE go expert by
    expert (same bits) instead of reading a stale stack."""
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")
    moe = moe_layer(TINY, 3, seed=5).to(torch.bfloat16)
    w1, _, _ = moe._stacked()
    assert w1.dtype == torch.bfloat16 and moe.experts[2].w1.weight.data_ptr() == w1[2].data_ptr()
    moe.experts[1].w3.weight.copy_(torch.ones_like(moe.experts[1].w3.weight))
    assert bool((moe._stacked()[1][1] == 1).all())
    x, ids = (torch.randn(6, TINY.hidden_size) * 3).bfloat16(), torch.randint(0, TINY.vocab_size, (6,))
    moe.experts[0].w2.weight = torch.nn.Parameter(moe.experts[0].w2.weight.detach().clone() * 2, requires_grad=False)
    assert moe._stacked() is None
    experts, weights = moe.gate(x, ids)
    assert torch.equal(moe._routed_dense(x, experts, weights), moe._routed(x, experts, weights))


@pytest.fixture(scope="module")
def tiny_model():
    return V4Model(TINY, rounding=True).load_weights(random_weights(TINY, seed=3))


def with_pieces(model, fn, min_steps, kernels=False):
    """fn() with the decode steps run as padded pieces, no graphs (what a CPU can run); checks
    that at least `min_steps` steps went through them (2 pieces per layer and the head), and
    (`kernels`) that every layer's state updates and decode kernels ran as a piece too."""
    before, model.graphs = model.graphs, DecodeGraphs(capture=False)
    graphs = model.graphs
    try:
        out = fn()
    finally:
        model.graphs = before
    assert graphs.runs["head"] >= min_steps
    assert sum(graphs.runs.values()) >= min_steps * (2 * model.cfg.num_hidden_layers + 1)
    if kernels:
        decoded = Counter()
        for name, n in graphs.runs.items():
            if ".decode." in name:
                decoded[name.split(".")[0]] += n
        assert all(decoded[f"layer{i}"] >= min_steps for i in range(model.cfg.num_hidden_layers)), decoded
    return (out, graphs.runs) if kernels else out


def test_padded_decode_pieces_give_the_eager_logits(tiny_model):
    """Prompts of 150 (two chunks), 70 and 5 tokens on compact pages, then 9 decode steps of 3
    requests (CSA windows close in them; one request crosses position 128, where its first HCA
    window closes): every logit equal, bit for bit, with and without the padded pieces."""
    ps = prompts(TINY, [150, 70, 5, 125], seed=4)
    want, toks = paged_logits(tiny_model, ps, 9, 32 << 20, chunk=128)
    got, got_toks = with_pieces(tiny_model, lambda: paged_logits(tiny_model, ps, 9, 32 << 20, chunk=128), 8)
    assert got_toks == toks
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_padded_decode_pieces_on_the_kernel_path_in_the_interpreter(tiny_model, monkeypatch):
    """The same on the kernel path, where a step's state updates and kernels are one piece too.
    Decode positions 9-11, 6-8 and 2-4: in the second step CSA window 0 closes (position 3, no
    overlap yet), so that step's CSA layers run outside the piece, finishing the window that
    position 7 closes there; in the third, position 11 closes a window inside the piece."""
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")
    ps = prompts(TINY, [9, 6, 2], seed=5)
    want, toks = paged_logits(tiny_model, ps, 3, 32 << 20, chunk=128)
    (got, got_toks), runs = with_pieces(tiny_model, lambda: paged_logits(tiny_model, ps, 3, 32 << 20, chunk=128),
                                        2, kernels=True)
    csa = [i for i, r in enumerate(TINY.compress_ratios) if r == CSA]
    assert {name: n for name, n in runs.items() if ".finish." in name} == {
        f"layer{i}.{family}.finish.rounding1": 1 for i in csa for family in ("main", "index")}
    (p,) = pool_serials(runs)  # the CSA layers' pieces: the first step's appends, the third's closing
    assert all(runs[f"layer{i}.decode.rounding1.pools{p}"] == runs[f"layer{i}.decode.closing.rounding1.pools{p}"] == 1
               for i in csa)
    assert got_toks == toks
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def pool_serials(runs) -> set[str]:
    return {name.rsplit(".pools", 1)[1] for name in runs if ".pools" in name}


def test_a_piece_that_cannot_be_recorded_runs_eagerly_from_then_on(monkeypatch, caplog):
    """Out of memory (or any failure) while recording: a warning, the piece's eager result, and no
    second attempt for the same shapes; other pieces still record."""
    graphs = DecodeGraphs(capture=True)
    attempts = []

    def record(fn, args, produced, warmup_args=None):
        attempts.append(args[0].shape)
        if args[0].shape[0] == 16:
            raise torch.OutOfMemoryError("no room for the graph pool")
        inputs = [a.clone() for a in args]  # a stand-in for a graph: replay recomputes eagerly
        rec = SimpleNamespace(inputs=inputs, outputs=fn(*inputs))
        rec.graph = SimpleNamespace(replay=lambda: rec.outputs.copy_(fn(*inputs)))
        return rec

    monkeypatch.setattr(graphs, "_record", record)
    x = torch.arange(32.0).view(16, 2)
    for _ in range(3):
        assert torch.equal(graphs.run("piece", lambda t: t * 2, x), x * 2)
    assert attempts == [(16, 2)] and len(graphs) == 0 and "not recorded" in caplog.text
    y = torch.arange(64.0).view(32, 2)
    for _ in range(2):  # 32 rows: recorded once, then replayed with the new inputs copied in
        assert torch.equal(graphs.run("piece", lambda t: t * 2, y), y * 2)
        y = y + 1
    assert attempts == [(16, 2), (32, 2)] and len(graphs) == 1


def test_fixed_buffers_are_copied_once_per_set_of_sources_and_read_in_place():
    """A step's tables go into buffers kept per name and shapes: graphs read them in place (they
    count as produced), the next layer's call with the same tensors copies nothing, the next
    step's tensors are copied into the same buffers; without graphs the tensors pass through."""
    graphs = DecodeGraphs(capture=True)
    a, b = torch.arange(4), torch.arange(6.0).view(2, 3)
    bufs = graphs.fixed("tables", (a, b))
    assert bufs[0] is not a and torch.equal(bufs[0], a) and torch.equal(bufs[1], b)
    assert all(graphs._outputs[id(t)] is t for t in bufs)
    a.add_(10)  # changed in place: the same tensors again are taken as already copied
    assert all(x is y for x, y in zip(graphs.fixed("tables", (a, b)), bufs)) and bufs[0].tolist() == [0, 1, 2, 3]
    c = torch.arange(4) + 100
    again = graphs.fixed("tables", (c, b))
    assert all(x is y for x, y in zip(again, bufs)) and bufs[0].tolist() == [100, 101, 102, 103]
    assert graphs.fixed("tables", (torch.arange(5), b))[0] is not bufs[0]  # other shapes: other buffers
    plain = DecodeGraphs(capture=False)
    assert plain.fixed("tables", (a, b)) == (a, b)


def test_moving_the_model_drops_its_recorded_graphs():
    """Graphs read the parameters where they were when recorded; after .to() they would read
    freed memory, so the model forgets them (and records again on its next decode step)."""
    model = V4Model(TINY).load_weights(random_weights(TINY, seed=1))
    model.graphs = DecodeGraphs(capture=False)
    model.to(torch.float64)
    assert model.graphs is None and model.head.weight.dtype == torch.float64


def test_cpu_models_decode_eagerly(tiny_model):
    paged_logits(tiny_model, prompts(TINY, [20], seed=6), 2, 32 << 20)
    assert tiny_model.graphs is None


# ---- GPU: replayed graphs against the same pieces run eagerly ----------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_replayed_decode_graphs_give_the_eager_pieces_bits_on_cuda(dtype):
    """flash-attn preset, 4 and 20 requests (buckets 16 and 32), 10 decode steps (CSA windows
    close, HCA windows stay open): graph replays give exactly the bits of the same padded pieces
    run op by op, and graphs were in fact recorded for both buckets, every piece of them (a piece
    that cannot be recorded runs eagerly: same bits, but the step slows down by half)."""
    cfg = preset("flash-attn")
    model = V4Model(cfg, dtype=dtype, rounding=True).load_weights(random_weights(cfg, 0)).cuda()
    for lengths in ([700, 300, 130, 5], [40 + 13 * i for i in range(20)]):
        ps = prompts(cfg, lengths, seed=len(lengths))
        (eager, toks), _ = with_pieces(model, lambda: paged_logits(model, ps, 10, 4 << 30, chunk=512), 8, kernels=True)
        graphed, got_toks = paged_logits(model, ps, 10, 4 << 30, chunk=512, follow=toks)
        assert model.graphs is not None and len(model.graphs) > 0
        for w, g in zip(eager, graphed):
            assert torch.equal(w, g)
    assert all(rec is not None for rec in model.graphs._recorded.values())
    assert {k[1][0][0][0] for k in model.graphs._recorded} == {16, 32}


def test_bad_token_ids_are_refused_before_any_state_changes(tiny_model):
    """Ids are checked on the host (no device sync per step): a bad id fails the whole batch
    with nothing appended to any request's state."""
    good, bad = tiny_model.new_state(), tiny_model.new_state()
    for tokens in ([5, TINY.vocab_size], [-1], []):
        with pytest.raises(ValueError, match="token id outside|no new tokens"):
            tiny_model([(good, [3, 4]), (bad, tokens)])
        assert good.num_tokens == 0 and bad.num_tokens == 0
    tiny_model([(good, [3, 4])])
    assert good.num_tokens == 2


def test_few_rows_on_the_kernel_path_keep_the_picks_on_the_device(monkeypatch):
    """Up to moe.DEVICE_MAX_ROWS rows an eager forward runs the picked experts' kernels (no host
    read of the picks); more rows go expert by expert. Same bits either way."""
    from kernels import picked_experts
    from workers import moe as moe_mod

    monkeypatch.setenv("V4SERVE_KERNELS", "triton")
    moe = moe_layer(TINY, 3, seed=6)
    x, ids = torch.randn(20, TINY.hidden_size) * 3, torch.randint(0, TINY.vocab_size, (20,))
    experts, weights = moe.gate(x, ids)
    want = moe._routed(x, experts, weights) + moe.shared_experts(x)
    calls = []
    real = picked_experts.moe
    monkeypatch.setattr(picked_experts, "moe", lambda *a: calls.append(1) or real(*a))
    assert torch.equal(moe(x, ids), want) and calls == [1]
    monkeypatch.setattr(moe_mod, "DEVICE_MAX_ROWS", 8)
    assert torch.equal(moe(x, ids), want) and calls == [1]