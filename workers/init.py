"""Deterministic random weights for a config (the tiny default and test models).

Scales keep activations O(1) through RMSNorms and make every mechanism matter: non-zero position
biases (ape), sinks, mHC biases and router biases, and a hash table with distinct experts.
"""

from __future__ import annotations

import torch

from .config import CSA, HCA, ModelConfig


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Native-named float32 tensors (plus int64 tid2eid) for every parameter of the model."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    def proj(out: int, inp: int) -> torch.Tensor:
        return normal(out, inp, std=inp**-0.5)

    def norm(n: int) -> torch.Tensor:
        return normal(n, std=0.1, mean=1.0)

    d, H, D, q = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.q_lora_rank
    hc, V, E, inter = cfg.hc_mult, cfg.vocab_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    w: dict[str, torch.Tensor] = {
        "embed.weight": normal(V, d),
        "head.weight": proj(V, d),
        "norm.weight": norm(d),
        "hc_head_fn": proj(hc, hc * d),
        "hc_head_base": normal(hc, std=0.5),
        "hc_head_scale": normal(1, std=0.1, mean=1.0),
    }
    for i, ratio in enumerate(cfg.compress_ratios):
        p = f"layers.{i}."
        w[p + "attn_norm.weight"] = norm(d)
        w[p + "ffn_norm.weight"] = norm(d)
        for site in ("attn", "ffn"):
            w[p + f"hc_{site}_fn"] = proj((2 + hc) * hc, hc * d)
            w[p + f"hc_{site}_base"] = normal((2 + hc) * hc, std=0.5)
            w[p + f"hc_{site}_scale"] = normal(3, std=0.1, mean=1.0)
        a = p + "attn."
        w[a + "attn_sink"] = normal(H)
        w[a + "wq_a.weight"] = proj(q, d)
        w[a + "q_norm.weight"] = norm(q)
        w[a + "wq_b.weight"] = proj(H * D, q)
        w[a + "wkv.weight"] = proj(D, d)
        w[a + "kv_norm.weight"] = norm(D)
        w[a + "wo_a.weight"] = proj(cfg.o_groups * cfg.o_lora_rank, H * D // cfg.o_groups)
        w[a + "wo_b.weight"] = proj(d, cfg.o_groups * cfg.o_lora_rank)
        if ratio in (CSA, HCA):
            _compressor(w, a + "compressor.", d, D, ratio, proj, normal, norm)
        if ratio == CSA:
            w[a + "indexer.wq_b.weight"] = proj(cfg.index_n_heads * cfg.index_head_dim, q)
            w[a + "indexer.weights_proj.weight"] = proj(cfg.index_n_heads, d)
            _compressor(w, a + "indexer.compressor.", d, cfg.index_head_dim, CSA, proj, normal, norm)
        f = p + "ffn."
        w[f + "gate.weight"] = proj(E, d)
        if cfg.is_hash_layer(i):
            w[f + "gate.tid2eid"] = torch.stack([torch.randperm(E, generator=g)[: cfg.num_experts_per_tok] for _ in range(V)])
        else:
            w[f + "gate.bias"] = normal(E, std=0.1)
        for e in range(E):
            _expert(w, f + f"experts.{e}.", d, inter, proj)
        _expert(w, f + "shared_experts.", d, inter * cfg.n_shared_experts, proj)
    return w


def _compressor(w, prefix, d, width, ratio, proj, normal, norm):
    c = 2 if ratio == CSA else 1
    w[prefix + "wkv.weight"] = proj(c * width, d)
    w[prefix + "wgate.weight"] = proj(c * width, d)
    w[prefix + "ape"] = normal(ratio, c * width, std=0.5)
    w[prefix + "norm.weight"] = norm(width)


def _expert(w, prefix, d, inter, proj):
    w[prefix + "w1.weight"] = proj(inter, d)
    w[prefix + "w3.weight"] = proj(inter, d)
    w[prefix + "w2.weight"] = proj(d, inter)
