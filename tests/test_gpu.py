"""The same model and engine on CUDA (run with `pytest -m gpu` on a GPU machine)."""

import pytest
import torch

from model_configs import TINY
from workers.config import preset
from workers.engine import Engine, EngineConfig
from workers.generate import generate_ids
from workers.init import random_weights
from workers.model import V4Model
from workers.sampling import SamplingParams

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def prompts(cfg, lengths):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_engine_on_cuda_matches_the_monolithic_model_on_cuda(dtype):
    model = V4Model(TINY, dtype=dtype).load_weights(random_weights(TINY, 0)).cuda()
    ps = prompts(TINY, [700, 129, 5, 300])
    alone = [[s.token_id for s in generate_ids(model, p, GREEDY)] for p in ps]
    eng = Engine(model, EngineConfig(budget_bytes=256 << 20, max_requests=4, layout="float"))
    ids = [eng.add_request(p, GREEDY) for p in ps]
    out = eng.run()
    assert [out[i] for i in ids] == alone


def test_flash_attn_preset_runs_in_bf16_with_the_compact_cache(monkeypatch):
    """The engine on pages equals the monolithic model, bit for bit, on the reference path (the
    kernel path is compared in tests/test_kernels_engine.py)."""
    monkeypatch.setenv("V4SERVE_KERNELS", "torch")
    cfg = preset("flash-attn")
    model = V4Model(cfg, dtype=torch.bfloat16, rounding=True).load_weights(random_weights(cfg, 0)).cuda()
    p = prompts(cfg, [1500])[0]
    alone = [s.token_id for s in generate_ids(model, p, GREEDY)]
    eng = Engine(model, EngineConfig(budget_bytes=4 << 30, max_requests=2, layout="compact"))
    rid = eng.add_request(p, GREEDY)
    assert eng.run()[rid] == alone
