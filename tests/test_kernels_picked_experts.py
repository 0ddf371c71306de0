"""The picked-experts MoE kernels (kernels/picked_experts.py): the grouping of a batch's picks
against its torch reference, and the layer's output bit for bit against MoE._routed's
composition: each expert through expert_mlp's kernels (which test_kernels_expert_mlp.py holds
against per-expert matmuls) on every row, the picks weighted and added in expert order by the
torch reference's chain, then the shared expert's output."""

import pytest
import torch

from kernels import expert_mlp, picked_experts
from kernels.moe_elementwise_ref import add_weighted
from kernels.picked_experts_ref import group_picks
from test_kernels_expert_mlp import triton_mode  # noqa: F401 (a fixture)
from test_kernels_expert_mlp import weights as expert_weights


def table_of(experts, weights, E):
    """[M, k, E]: a slot's weight where it picked the expert, else 0 (workers/moe.py _routed_dense)."""
    ids = torch.arange(E, device=experts.device)
    return torch.where(experts[:, :, None] == ids, weights[:, :, None], 0.0)


def reference(x, routed, shared, experts, weights, limit):
    (w1, w3, w2), (s1, s3, s2) = routed, shared
    y = expert_mlp.expert_down(expert_mlp.expert_up(x, w1, w3, limit), w2)
    table = table_of(experts, weights, w1.shape[0])
    acc = torch.zeros_like(x)
    for e in range(w1.shape[0]):  # an unpicked expert's weight is 0: it adds nothing
        acc = add_weighted(acc, y[e], table[:, :, e])
    return acc + expert_mlp.expert_down(expert_mlp.expert_up(x, s1[None], s3[None], limit), s2[None])[0]


def picks(M, k, E, seed, repeat=False):
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)])
    if repeat:  # a hash layer's table can give a row one expert in two slots
        experts[::2, 1] = experts[::2, 0]
    return experts, torch.rand(M, k, generator=g) + 0.1


@pytest.mark.parametrize("M,k,E,repeat", [(1, 2, 8, False), (3, 2, 8, True), (7, 3, 5, False), (40, 6, 64, True)])
def test_grouping_matches_its_reference(triton_mode, M, k, E, repeat):
    experts, weights = picks(M, k, E, seed=M, repeat=repeat)
    got = picked_experts.group_picks(experts, weights, E)
    want = group_picks(experts, weights, E)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    # the groups cover every pair once, each group's pairs pick its expert
    order, start = want["order"].long(), want["start"].long()
    assert sorted(order.tolist()) == list(range(M * k))
    for g, e in enumerate(want["expert"].tolist()):
        members = order[start[g] : start[g + 1]]
        assert (experts.reshape(-1)[members] == e).all()


def test_a_pick_outside_the_experts_is_in_no_group(triton_mode):
    experts = torch.tensor([[2, 9], [-1, 2], [0, 2]])
    weights = torch.rand(3, 2)
    got = picked_experts.group_picks(experts, weights, 4)
    want = group_picks(experts, weights, 4)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert want["start"].tolist() == [0, 1, 4, 4, 4]  # experts 0 and 2; 4 valid pairs
    assert want["by_row"][0].tolist() == [1, -1] and want["w_by_row"][0, 1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,k,E,repeat", [(1, 2, 8, False), (5, 4, 8, True), (70, 2, 3, False)])
def test_picked_experts_give_the_routed_moe_bits(triton_mode, dtype, M, k, E, repeat):
    """70 rows of 3 experts: groups, and the shared expert's rows, of more than a row tile; 4
    picks a row: a sum whose order shows in its bits."""
    I, D = 32, 96
    routed = expert_weights(E, I, D, dtype, seed=E)
    shared = [w[0] for w in expert_weights(1, I, D, dtype, seed=E + 1)]
    x = (torch.randn(M, D) * 2).to(dtype)
    experts, weights = picks(M, k, E, seed=M + 1, repeat=repeat)
    got = picked_experts.moe(x, routed, shared, experts, weights, 1.5)
    assert torch.equal(got, reference(x, routed, shared, experts, weights, 1.5))


def test_picked_experts_reject_mismatched_operands(triton_mode):
    routed = expert_weights(4, 16, 32, torch.float32, seed=2)
    shared = [w[0] for w in expert_weights(1, 16, 32, torch.float32, seed=3)]
    x = torch.randn(3, 32)
    experts, weights = picks(3, 2, 4, seed=3)
    assert picked_experts.takes(x, routed, shared, experts)
    with pytest.raises(ValueError, match="do not match"):
        picked_experts.moe(x[:, :16], routed, shared, experts, weights, 1.0)
    narrow = [w[:8] for w in shared[:2]] + [shared[2][:, :8]]
    assert not picked_experts.takes(x, routed, narrow, experts)  # the MoE runs it another way
    with pytest.raises(ValueError, match="do not match"):  # a shared expert of another width
        picked_experts.moe(x, routed, narrow, experts, weights, 1.0)
    with pytest.raises(ValueError, match="both"):
        picked_experts.moe(x, routed, shared, experts[:, :1], weights, 1.0)
    assert not picked_experts.takes(x.double(), routed, shared, experts)
    with pytest.raises(ValueError, match="kernel path"):
        picked_experts.moe(x.double(), routed, shared, experts, weights, 1.0)
    many = torch.zeros(picked_experts.MAX_PAIRS // 2 + 1, 2, dtype=torch.long)
    assert not picked_experts.takes(x, routed, shared, many)
    with pytest.raises(ValueError, match="pairs"):  # one program sorts them all: a decode step's
        picked_experts.group_picks(many, many.float(), 4)


@pytest.mark.gpu
def test_gpu_picked_experts_at_the_model_shapes(triton_mode):
    """flash-attn's 8 experts x 256 x 4096 at 1 row, and at 16 rows of which 15 pick the same
    pair (a batch-1 step's bucket), and 256 experts x 2 picks of 32 rows (a V4-sized expert count):
    MoE._routed's composition, bit for bit."""
    for E, M in ((8, 1), (8, 16), (256, 32)):
        for dtype in (torch.bfloat16, torch.float32):
            routed = expert_weights(E, 256, 4096, dtype, seed=E, device="cuda")
            shared = [w[0] for w in expert_weights(1, 256, 4096, dtype, seed=E + 1, device="cuda")]
            x = (torch.randn(M, 4096, device="cuda") * 2).to(dtype)
            experts, weights = picks(M, 2, E, seed=M, repeat=M > 1)
            if M == 16:
                experts[1:] = experts[1]
            experts, weights = experts.cuda(), weights.cuda()
            want = reference(x, routed, shared, experts, weights, 10.0)
            assert torch.equal(picked_experts.moe(x, routed, shared, experts, weights, 10.0), want)
            got = picked_experts.group_picks(experts, weights, E)
            for name, value in group_picks(experts.cpu(), weights.cpu(), E).items():
                assert torch.equal(got[name].cpu(), value), name
