"""Chunk prefill attention: the Triton kernel equals the reference (interpreter on CPU, small
shapes; the `gpu` tests use the flash-attn shapes).

Tolerances, output vs reference: float32 1e-5 (abs and rel: only the summation order differs);
bfloat16 2e-2 (both round the probabilities to bf16 before PV, at different points of the online
softmax, and round the output to bf16: about one bf16 ulp of keys of magnitude < 4).
"""

import pytest
import torch

from kernels.prefill_attention import prefill_attention_triton, reference
from workers.config import CSA, HCA, SWA

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
WINDOW = 128


def chunk_case(S, H, D, start, n_entries, K, dtype, device="cpu", seed=0):
    """A chunk of S queries at positions start.. with the window tail a real layer state holds."""
    g = torch.Generator().manual_seed(seed)
    prev = min(start, WINDOW - 1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    topk = torch.randint(-1, max(n_entries, 1), (S, K), generator=g, dtype=torch.int32)
    if n_entries == 0:
        topk.fill_(-1)
    return dict(
        q=rnd(S, H, D), sink=torch.randn(H, generator=g).to(device), window_keys=rnd(prev + S, D),
        base=prev - (WINDOW - 1), entries=rnd(max(n_entries, 1), D)[:n_entries],
        topk=topk.to(device),
        positions=torch.arange(start, start + S, device=device), window=WINDOW,
    )


CASES = [  # (S, H, D, start, entries, topk)
    (6, 4, 128, 0, 0, 8),  # first chunk: window slots before position 0 are masked, no entries yet
    (8, 4, 128, 250, 70, 24),  # HCA count goes 1 -> 2 inside the chunk (t = 255)
    (5, 2, 512, 700, 175, 40),  # V4 head_dim; topk longer than one key tile
]


@pytest.mark.parametrize("ratio", [SWA, CSA, HCA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_reference(ratio, dtype, case):
    S, H, D, start, n, K = case
    c = chunk_case(S, H, D, start, n, K, dtype)
    got = prefill_attention_triton(ratio=ratio, **c)
    want = reference(ratio=ratio, **c)
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


@pytest.mark.parametrize("ratio", [CSA, HCA])
def test_entries_a_query_may_not_see_do_not_change_its_output(ratio):
    """HCA entries past (t+1)//128 and CSA entries not picked (or picked as -1) hold huge values:
    if any leaked through a mask the output would move."""
    c = chunk_case(8, 4, 128, 250, 70, 24, torch.float32)
    if ratio == CSA:
        c["topk"][:, ::3] = -1
    seen = torch.zeros(70, dtype=torch.bool)
    if ratio == CSA:
        seen[c["topk"][c["topk"] >= 0].long()] = True
    else:
        seen[: (257 + 1) // HCA] = True
    base = prefill_attention_triton(ratio=ratio, **c)
    c["entries"] = torch.where(seen[:, None], c["entries"], torch.full_like(c["entries"], 1e4))
    torch.testing.assert_close(prefill_attention_triton(ratio=ratio, **c), base, atol=0, rtol=0)


@pytest.mark.parametrize("ratio", [CSA, HCA])
def test_a_query_gets_the_same_bits_alone_as_inside_its_chunk(ratio):
    c = chunk_case(8, 4, 128, 250, 70, 24, torch.bfloat16)
    whole = prefill_attention_triton(ratio=ratio, **c)
    for i in (0, 5, 7):
        alone = dict(c, q=c["q"][i : i + 1], topk=c["topk"][i : i + 1], positions=c["positions"][i : i + 1],
                     base=c["base"] + i)
        assert torch.equal(prefill_attention_triton(ratio=ratio, **alone), whole[i : i + 1])


def test_permuting_the_picked_entries_permutes_nothing_but_the_summation_order():
    """The kernel gathers entries by index: permuting entries and renaming the picks accordingly
    is the same key set."""
    c = chunk_case(4, 4, 128, 700, 175, 40, torch.float32)
    perm = torch.randperm(175, generator=torch.Generator().manual_seed(1))
    inv = torch.argsort(perm).to(torch.int32)
    renamed = torch.where(c["topk"] >= 0, inv[c["topk"].clamp(min=0).long()], -1)
    moved = dict(c, entries=c["entries"][perm], topk=renamed)
    torch.testing.assert_close(prefill_attention_triton(ratio=CSA, **moved),
                               prefill_attention_triton(ratio=CSA, **c), **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("ratio", [SWA, CSA, HCA])
@pytest.mark.parametrize("start", [0, 4096 - 200])
def test_kernel_equals_reference_at_flash_attn_shapes(ratio, start):
    """64 heads x 512, top-512, a 512-token chunk in bf16 on the GPU."""
    S, n = 512, (start + 512) // 4
    c = chunk_case(S, 64, 512, start, n, 512, torch.bfloat16, device="cuda")
    got = prefill_attention_triton(ratio=ratio, **c)
    want = reference(ratio=ratio, **c)
    torch.testing.assert_close(got.float(), want.float(), **TOL[torch.bfloat16])
