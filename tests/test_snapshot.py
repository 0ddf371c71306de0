"""A state snapshotted at any position, restored in a fresh process, continues identically."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_configs import TINY
from workers.init import random_weights
from workers.model import V4Model
from workers.state import RequestState, SnapshotError

POSITIONS = [1, 3, 4, 5, 127, 128, 129, 255, 256, 257, 700]
CONTINUE = 6

CHILD = r"""
import json, sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from model_configs import TINY
from workers.init import random_weights
from workers.model import V4Model
from workers.state import RequestState
model = V4Model(TINY).load_weights(random_weights(TINY, seed=0))
out = {}
for f in sorted(Path(sys.argv[1]).glob("*.state")):
    state = RequestState.from_bytes(f.read_bytes(), TINY)
    nxt, toks = int(f.stem.split("_")[1]), []
    for _ in range(int(sys.argv[3])):
        toks.append(nxt)
        nxt = int(model([(state, [nxt])])[0].argmax())
    out[f.stem] = toks
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def model():
    return V4Model(TINY).load_weights(random_weights(TINY, seed=0))


def greedy(model, state, first, n):
    toks, nxt = [], first
    for _ in range(n):
        toks.append(nxt)
        nxt = int(model([(state, [nxt])])[0].argmax())
    return toks


def test_snapshot_restored_in_a_fresh_process_continues_with_identical_tokens(model, tmp_path):
    ids = torch.randint(2, 258, (max(POSITIONS),), generator=torch.Generator().manual_seed(3)).tolist()
    expected = {}
    for p in POSITIONS:
        state = model.new_state()
        first = int(model([(state, ids[:p])])[0].argmax())
        blob = state.to_bytes()
        expected[f"{p:04d}_{first}"] = greedy(model, state, first, CONTINUE)
        (tmp_path / f"{p:04d}_{first}.state").write_bytes(blob)
    tests_dir = str(Path(__file__).parent)
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), tests_dir, str(CONTINUE)],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == expected


def test_snapshot_round_trip_preserves_every_tensor_bit_for_bit(model):
    state = model.new_state()
    model([(state, list(range(2, 260 - 2)) + [5] * 137)])  # 393 tokens: open windows in both rates
    back = RequestState.from_bytes(state.to_bytes(), TINY)
    assert back.num_tokens == state.num_tokens == 393
    for a, b in zip(state.layers, back.layers):
        assert torch.equal(a.window(), b.window())
        for fam in a.families():
            assert torch.equal(a.entries(fam), b.entries(fam))
        for name, c in a.compressors.items():
            d = b.compressors[name]
            assert torch.equal(c.open_kv, d.open_kv) and torch.equal(c.open_score, d.open_score)
            assert (c.overlap_kv is None) == (d.overlap_kv is None)
            if c.overlap_kv is not None:
                assert torch.equal(c.overlap_kv, d.overlap_kv) and torch.equal(c.overlap_score, d.overlap_score)


def test_snapshot_header_is_msgpack_not_pickle(model):
    state = model.new_state()
    model([(state, [5, 6, 7, 8, 9])])
    blob = state.to_bytes()
    assert blob[:4] == b"V4ST" and b"pickle" not in blob and b"\x80\x04" != blob[8:10]


def test_corrupt_or_mismatched_snapshots_are_rejected_with_a_clear_error(model):
    state = model.new_state()
    model([(state, list(range(2, 50)))])
    blob = state.to_bytes()
    with pytest.raises(SnapshotError, match="magic"):
        RequestState.from_bytes(b"XXXX" + blob[4:], TINY)
    with pytest.raises(SnapshotError, match="truncated"):
        RequestState.from_bytes(blob[:-10], TINY)
    with pytest.raises(SnapshotError, match="different model"):
        RequestState.from_bytes(blob, TINY.model_copy(update={"index_topk": 8}))
