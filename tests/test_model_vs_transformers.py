"""Our model against transformers' DeepseekV4ForCausalLM (5.23.0), same config, same weights."""

import pytest
import torch

from load_tests.transformers_peer import hf_greedy, hf_logits, hf_model_from
from model_configs import ALL
from workers.init import random_weights
from workers.model import V4Model

PROMPT_LEN = 700  # windows wrap, 5 HCA entries close, 175 CSA entries > every index_topk


@pytest.fixture(scope="module", params=ALL, ids=lambda c: c.name)
def pair(request, tmp_path_factory):
    cfg = request.param
    weights = random_weights(cfg, seed=1)
    ours = V4Model(cfg).load_weights(weights)
    theirs = hf_model_from(cfg, weights, tmp_path_factory.mktemp(cfg.name))
    ids = torch.randint(2, cfg.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(7)).tolist()
    return cfg, ours, theirs, ids


def test_prompt_logits_match_transformers_within_1e4_relative(pair):
    cfg, ours, theirs, ids = pair
    assert cfg.index_topk < PROMPT_LEN // 4  # the indexer really selects
    got = ours([(ours.new_state(), ids)], all_logits=True)[0]
    want = hf_logits(theirs, ids)
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel <= 1e-4, f"max relative error {rel:.2e}"


def test_64_greedy_tokens_match_transformers_generate(pair):
    cfg, ours, theirs, ids = pair
    state = ours.new_state()
    logits = ours([(state, ids)])[0]
    tokens = []
    for _ in range(64):
        tokens.append(int(logits.argmax()))
        logits = ours([(state, [tokens[-1]])])[0]
    assert tokens == hf_greedy(theirs, ids, 64)
