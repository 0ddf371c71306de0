"""The radix-select kernel (kernels/key_select.py) against torch.topk over the same keys
(kernels/key_select_ref.py). Exact: the keys of visible entries are distinct, so the picks and
their order are unique; sentinels (invisible columns) all map to -1."""

import pytest
import torch

from kernels import key_select as KS
from kernels import key_select_ref as R


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")


def keys_of(scores: torch.Tensor, n_visible: list[int]) -> torch.Tensor:
    return R.keys_of_scores(scores, torch.tensor(n_visible))


def tied_scores(S: int, n: int, seed: int) -> torch.Tensor:
    """Random scores with what real rows have: runs of equal scores (ReLU's zeros, a head sum
    repeated), negatives, and values equal in their top bits but not their last."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(S, n, generator=g)
    s[:, ::7] = 0.0
    s[:, 3::11] = 1.25
    s[:, 5::13] = -2.0
    near = torch.randint(0, n, (S, n // 9), generator=g)
    s.scatter_(1, near, 1.25 + torch.randint(1, 50, (S, n // 9), generator=g).float() * 2**-20)
    return s


@pytest.mark.parametrize("S,n,k,visible", [
    (3, 700, 64, [700, 650, 40]),      # a row with fewer visible entries than k: sentinels tie
    (2, 1000, 100, [1000, 999]),       # k not a power of two; n not a multiple of the step
    (1, 517, 512, [517]),              # k close to n
    (2, 300, 300, [300, 0]),           # every column picked; a row with nothing visible
    (1, 3000, 64, [3000]),             # rows longer than a chunk: a level of chunk picks first
    (2, 5000, 512, [5000, 2100]),      # four levels (the interpreter's chunks are 1,024 keys)
])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("floor_from", [0, 1])  # row floors off, and on for every call with levels
def test_picks_equal_torch_topk_with_ties_sentinels_and_odd_sizes(triton_mode, monkeypatch, bits, floor_from, S,
                                                                   n, k, visible):
    monkeypatch.setattr(KS, "RADIX_BITS", bits)
    monkeypatch.setattr(KS, "FLOOR_FROM", floor_from)
    keys = keys_of(tied_scores(S, n, seed=S * n + k), visible)
    got = KS.select_entries(keys, k)
    want = R.select_entries(keys, k)
    assert torch.equal(got, want)
    for r, v in enumerate(visible):  # the test means something: the picks are the visible top
        assert int((got[r] >= 0).sum()) == min(k, v)


@pytest.mark.parametrize("bits", [4, 8])
def test_scores_tied_in_every_bit_of_the_score_half_go_to_the_lower_entry(triton_mode, monkeypatch, bits):
    """More keys share the k-th score than are still needed: the entry half decides (its rounds)."""
    monkeypatch.setattr(KS, "RADIX_BITS", bits)
    s = torch.full((1, 400), 0.5)
    s[0, 350:] = 3.0  # 50 above, then 350 tied for the remaining 14 picks
    got = KS.select_entries(keys_of(s, [400]), 64)
    assert torch.equal(got[0], torch.cat([torch.arange(350, 400), torch.arange(0, 14)]).int())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("floor_from", [0, 1])
def test_scores_tied_across_chunks_and_levels_go_to_the_lowest_columns(triton_mode, monkeypatch, bits, floor_from):
    """Eight distinct scores over rows of several chunks (the interpreter's are 1,024 keys), as
    repeated index keys give: the k-th score is tied in every chunk and at every level, and the
    picks among the tied keys must be the lowest columns. Each level keeps its picks in column
    order for this; a level that stored the keys above T before the tied ones would not."""
    monkeypatch.setattr(KS, "RADIX_BITS", bits)
    monkeypatch.setattr(KS, "FLOOR_FROM", floor_from)
    g = torch.Generator().manual_seed(11)
    s = torch.randint(0, 8, (3, 5000), generator=g).float() * 0.5 - 1.0
    keys = keys_of(s, [5000, 4321, 3000])
    got = KS.select_entries(keys, 512)
    assert torch.equal(got, R.select_entries(keys, 512))
    top = s[0].max()  # the row's best score is held by about 625 keys: the picks are its first 512
    assert torch.equal(got[0], torch.nonzero(s[0] == top).flatten()[:512].int())


@pytest.mark.parametrize("floor_from", [0, 1])
def test_keys_past_a_rows_length_are_never_read(triton_mode, monkeypatch, floor_from):
    """With lengths, a row's keys from lengths[r] on count as sentinels whatever they hold: rows of
    several levels (the interpreter's chunks are 1,024 keys), a length inside a chunk, one at a
    chunk's end, one shorter than k, zero, and the whole row. Past each length the keys are the
    largest possible, so reading any of them would pick it (by the row floors' sample too)."""
    monkeypatch.setattr(KS, "FLOOR_FROM", floor_from)
    lengths = [5000, 2049, 2048, 300, 0, 4000]
    keys = keys_of(tied_scores(6, 5000, seed=5), [5000] * 6)
    garbage = keys.clone()
    for r, n in enumerate(lengths):
        garbage[r, n:] = torch.iinfo(torch.int64).max - torch.arange(5000 - n)
    got = KS.select_entries(garbage, 512, torch.tensor(lengths, dtype=torch.int32))
    assert torch.equal(got, R.select_entries(keys_of(tied_scores(6, 5000, seed=5), lengths), 512))
    assert [int((row >= 0).sum()) for row in got] == [min(512, n) for n in lengths]


def score_halves(keys: torch.Tensor) -> torch.Tensor:
    """The keys' score halves as the kernels compare them (uint32 order), in int64."""
    return ((keys >> 32) + 2**31)


@pytest.mark.parametrize("case", ["random", "tied", "lengths", "short"])
def test_row_floors_are_at_most_the_kth_score_and_leave_few_keys(triton_mode, monkeypatch, case):
    """A floor above a row's k-th score half would drop picks; one far below it would spare no
    rounds. Every floor must be at most the k-th largest score half, and on rows of continuous
    scores leave about k x n / sample keys (the bound here is 4x that); a row whose sample holds
    fewer than k live keys gets 0 (nothing dropped: every key is at or above it)."""
    monkeypatch.setattr(KS, "FLOOR_FROM", 1)
    S, n, k = 3, 8192, 64
    g = torch.Generator().manual_seed(7)
    scores = tied_scores(S, n, seed=7) if case == "tied" else torch.randn(S, n, generator=g)
    visible = {"short": [n, 2 * k, k // 2]}.get(case, [n] * S)
    keys = keys_of(scores, visible)
    lengths = torch.tensor([n, 5000, 1500], dtype=torch.int32) if case == "lengths" else None
    if lengths is not None:
        keys = keys.clone()
        for r, m in enumerate(lengths.tolist()):
            keys[r, m:] = torch.iinfo(torch.int64).max  # past a length: never read
    floors = KS.row_floors(keys, k, lengths).long() & 0xFFFFFFFF
    for r in range(S):
        m = n if lengths is None else int(lengths[r])
        row = score_halves(keys[r, :m])
        kth = int(row.topk(k).values[-1])
        assert int(floors[r]) <= kth
        if case == "short" and r:  # 2k and k/2 live keys: about k/4 and none in the sample
            assert floors[r] == 0
        elif case != "tied":  # continuous scores: the floor sits near the (k n / sample)-th key
            kept = int((row >= floors[r]).sum())
            assert k <= kept <= 4 * k * m // KS.INTERPRET_FLOOR_SAMPLE + k, (r, kept)


def test_lengths_of_the_wrong_shape_or_type_are_refused(triton_mode):
    keys = keys_of(torch.randn(2, 64), [64, 64])
    for bad in (torch.tensor([64], dtype=torch.int32), torch.tensor([64, 64])):
        with pytest.raises(ValueError, match="lengths must be int32"):
            KS.select_entries(keys, 8, bad)


def test_non_finite_scores_are_not_picked_as_entries(triton_mode):
    s = torch.randn(1, 256, generator=torch.Generator().manual_seed(3))
    s[0, 10] = float("inf")
    s[0, 20] = float("-inf")
    keys = keys_of(s, [256])
    got = KS.select_entries(keys, 256)
    assert torch.equal(got, R.select_entries(keys, 256))
    assert got[0, 0] == -1 and 10 not in got[0].tolist() and 20 not in got[0].tolist()


def test_bad_arguments_are_refused(triton_mode):
    keys = keys_of(torch.randn(1, 64), [64])
    with pytest.raises(ValueError, match="k=65"):
        KS.select_entries(keys, 65)
    with pytest.raises(ValueError, match="int64"):
        KS.select_entries(keys.int(), 8)
    with pytest.raises(ValueError, match="int64"):
        KS.select_entries(keys[:, ::2], 8)


@pytest.mark.gpu
@pytest.mark.parametrize("S,n", [(1, 32768), (1, 49152), (2, 262144), (32, 32768), (32, 262144)])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("floor_from", [0, 1])
def test_gpu_flash_attn_sizes(triton_mode, monkeypatch, bits, floor_from, S, n):
    monkeypatch.setattr(KS, "RADIX_BITS", bits)
    monkeypatch.setattr(KS, "FLOOR_FROM", floor_from)
    scores = tied_scores(S, n, seed=n + S).cuda()
    keys = keys_of(scores, [n - 3 * r for r in range(S)])
    assert torch.equal(KS.select_entries(keys, 512), R.select_entries(keys, 512))


def test_select_env_keeps_torch_topk_and_refuses_unknown_values(monkeypatch):
    assert KS.kernel_wins(4, 512, torch.device("cpu"))
    assert not KS.kernel_wins(KS.INTERPRET_MAX_ROWS + 1, 512, torch.device("cpu"))  # a prefill chunk
    assert not KS.kernel_wins(4, KS.INTERPRET_CHUNK, torch.device("cpu"))  # k over half a chunk
    monkeypatch.setenv("V4SERVE_SELECT", "torch")
    assert not KS.kernel_wins(4, 512, torch.device("cpu"))
    monkeypatch.setenv("V4SERVE_SELECT", "radix")
    with pytest.raises(ValueError, match="V4SERVE_SELECT"):
        KS.kernel_wins(4, 512, torch.device("cpu"))


def test_row_floors_are_taken_only_where_there_are_levels_and_keys_enough(monkeypatch):
    """FLOOR_FROM keys a call (0: never), a row longer than a chunk (else no level to spare work
    in) and a sample with room above k."""
    cpu = torch.device("cpu")
    n = 2 * KS.INTERPRET_CHUNK
    monkeypatch.setattr(KS, "FLOOR_FROM", 4 * n)
    assert KS.takes_floor(4, n, 64, cpu) and not KS.takes_floor(3, n, 64, cpu)
    assert not KS.takes_floor(8, KS.INTERPRET_CHUNK, 64, cpu)  # one chunk a row: no levels
    assert not KS.takes_floor(4, n, KS.INTERPRET_FLOOR_SAMPLE // 2 + 1, cpu)
    monkeypatch.setattr(KS, "FLOOR_FROM", 0)
    assert not KS.takes_floor(128, 1 << 20, 64, cpu)


def test_rows_whose_lengths_hold_few_keys_in_all_get_no_floor(triton_mode, monkeypatch):
    """One long row among short ones: the width (S x n) reaches FLOOR_FROM but the lengths do not,
    so the floor kernel gives every row 0 (its rounds would cost more than the first level saves);
    the same rows at their full width get floors."""
    S, n, k = 4, 8192, 64
    keys = keys_of(torch.randn(S, n, generator=torch.Generator().manual_seed(9)), [n] * S)
    monkeypatch.setattr(KS, "FLOOR_FROM", 3 * n)
    short = torch.tensor([n, 900, 900, 900], dtype=torch.int32)  # 10,892 keys < 24,576
    assert KS.takes_floor(S, n, k, torch.device("cpu"))  # what the host sees: 32,768 keys
    assert KS.row_floors(keys, k, short).tolist() == [0] * S
    assert (KS.row_floors(keys, k, torch.full((S,), n, dtype=torch.int32)) != 0).all()
    assert (KS.row_floors(keys, k) != 0).all()
    want = R.select_entries(keys_of(R.scores_from_keys(keys), short.tolist()), k)
    assert torch.equal(KS.select_entries(keys, k, short), want)
