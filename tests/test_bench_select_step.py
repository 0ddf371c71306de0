"""load_tests/bench_select_step.py's parts that need no GPU: the other tree's kernel it loads, the
keys it records from a step, and what it counts of them."""

import shutil
from pathlib import Path

import pytest
import torch

from kernels import indexer_topk as IT
from kernels import key_select_ref as R
from load_tests import bench_select_step as B

KERNELS = Path(__file__).resolve().parents[1] / "kernels"


def test_the_old_trees_kernel_is_loaded_beside_this_ones_and_gives_the_same_picks(monkeypatch, tmp_path):
    monkeypatch.setenv("V4SERVE_KERNELS", "triton")
    shutil.copytree(KERNELS, tmp_path / "kernels", ignore=shutil.ignore_patterns("__pycache__", "*.md"))
    old = B.load_old(str(tmp_path))
    assert old.__module__ == "old_kernels.key_select"  # not this tree's module under another name
    keys = R.keys_of_scores(torch.randn(2, 3000, generator=torch.Generator().manual_seed(5)), torch.tensor([3000, 900]))
    assert torch.equal(old(keys, 64), R.select_entries(keys, 64))
    assert torch.equal(B.torch_select(keys, 64), R.select_entries(keys, 64))
    with pytest.raises(SystemExit, match="no kernels/key_select.py"):
        B.load_old(str(tmp_path / "missing"))


def test_step_keys_records_each_selection_and_puts_the_real_one_back(monkeypatch):
    keys = [R.keys_of_scores(torch.randn(1, 700), torch.tensor([700])) for _ in range(2)]

    class State:
        def reserve(self, n):
            pass

        def release_old_window(self):
            pass

    class Model:
        cuda_graphs = True

        def __call__(self, batch):
            assert not self.cuda_graphs  # the keys come from an eager step
            return [IT.select_entries(k, 8) for k in keys]

    real = IT.select_entries
    monkeypatch.setattr(B.bk, "sync", lambda: None)
    model = Model()
    seen = B.step_keys(model, [State()])
    assert [torch.equal(a, b) for a, b in zip(seen, keys)] == [True, True]
    assert IT.select_entries is real and model.cuda_graphs


def test_distinct_top_scores_counts_the_score_halves_of_row_0s_top_k():
    s = torch.zeros(2, 1000)
    s[0, :300], s[0, 300:600] = 2.0, 1.0  # row 0's top 512: 300 at 2.0 and 212 at 1.0
    s[1] = torch.arange(1000.0)
    assert B.distinct_top_scores(R.keys_of_scores(s, torch.tensor([1000, 1000]))) == 2


def test_random_index_codes_make_the_indexer_rows_distinct_and_keep_their_scales(monkeypatch):
    """The synthetic states' indexer rows are picks among encoded_rows' few, so scores tie;
    random_index_codes redraws every row's FP4 codes and leaves its block scales (the row's last
    bytes) as encoded."""
    from workers.config import preset
    from workers.init import random_weights
    from workers.model import V4Model

    monkeypatch.setattr(B.bk, "DEVICE", "cpu")
    cfg = preset("tiny")
    model = V4Model(cfg, dtype=torch.float32).load_weights(random_weights(cfg, 0))
    rows = B.bk.encoded_rows(cfg, n=16)
    half = cfg.index_head_dim // 2
    for random_codes in (False, True):
        torch.manual_seed(0)
        pools = B.bk.synthetic_states(cfg, model, 300, 2, rows, random_index_codes=random_codes)[0].pools
        flat = pools.csa_index.reshape(-1, pools.csa_index.shape[-1])
        distinct = torch.unique(flat[:, :half], dim=0).shape[0]
        if random_codes:
            assert distinct == flat.shape[0]  # every row its own codes
            scales = {tuple(r) for r in rows[1][:, half:].tolist()}
            assert all(tuple(r) in scales for r in flat[:, half:].tolist())  # the encoded rows' scales
        else:
            assert distinct <= 16  # picks among the encoded rows
