"""A decode step's MoE layer: the picked experts' kernels (kernels/picked_experts.py) against the
bytes they must read and against the host-routed path.

    python -m load_tests.bench_experts [--preset flash-attn] [--experts 8,256] [--layers 6]

Each case is a decode step's rows and picks: "1 in 16" (batch 1 in a bucket of 16: its row picks
one pair of experts, the 15 padded rows another) and "32 random" (32 rows, k random picks each).
Per layer, over `--layers` layers' weights (more than L2 holds, so every layer reads its weights
from HBM):
  * the picked kernels, four launches replayed from a CUDA graph, as a graphed step runs them;
  * the weights they read (the distinct picked experts and the shared one) over that time, as a
    share of the HBM copy rate measured first in the same run (the ceiling: these launches are
    bound by bytes, a few rows against megabytes of weights);
  * MoE._routed plus the shared expert, the path that reads the picks on the host (an expert's
    kernels per picked expert on its rows), run eagerly as an ungraphed step would: its time, and
    its ratio to the picked kernels'. The two must give the same bits, or the run stops.
Prints a table, then one JSON line. `BENCH_DEVICE=cpu` is a smoke run in Triton's interpreter
(`--preset tiny`), as bench_kernels'.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

if os.environ.get("BENCH_DEVICE") == "cpu":  # the kernel path, emulated: set before triton imports
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["V4SERVE_KERNELS"] = "triton"

from kernels import picked_experts  # noqa: E402
from workers.config import ModelConfig, preset  # noqa: E402
from workers.moe import MoE  # noqa: E402

from . import bench_kernels as bk  # noqa: E402


def layers_of(cfg: ModelConfig, n: int, device: str) -> list[MoE]:
    """n routed (not hashed) MoE layers with random BF16 weights."""
    torch.manual_seed(0)
    out = []
    for _ in range(n):
        moe = MoE(cfg, cfg.num_hash_layers, torch.bfloat16).to(device)
        for p in moe.parameters():
            p.normal_(0, cfg.hidden_size**-0.5)
        out.append(moe)
    return out


def cases(cfg: ModelConfig, device: str) -> dict[str, torch.Tensor]:
    """Picks [rows, k] of each case."""
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(1)
    pair = torch.randperm(E, generator=g)
    padded = torch.cat([pair[:k][None], pair[k : 2 * k][None].expand(15, k)])
    spread = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(32)])
    return {"1 in 16": padded.to(device), "32 random": spread.to(device)}


def expert_bytes(moe: MoE, experts: torch.Tensor) -> int:
    """Weights the picked kernels read: each distinct picked expert's and the shared expert's."""
    one = sum(getattr(moe.experts[0], w).weight.nbytes for w in ("w1", "w3", "w2"))
    shared = sum(getattr(moe.shared_experts, w).weight.nbytes for w in ("w1", "w3", "w2"))
    return int(experts.unique().numel()) * one + shared


def run_case(layers: list[MoE], experts: torch.Tensor, ceil: dict, device: str) -> dict:
    cfg_d = layers[0].experts[0].w1.weight.shape[1]
    x = (torch.randn(experts.shape[0], cfg_d, device=device) * 2).bfloat16()
    weights = torch.rand(experts.shape, device=device) + 0.1

    def picked(moe: MoE) -> torch.Tensor:
        s = moe.shared_experts
        return picked_experts.moe(x, moe._stacked(), (s.w1.weight, s.w3.weight, s.w2.weight), experts, weights,
                                  s.limit)

    def routed(moe: MoE) -> torch.Tensor:
        return moe._routed(x, experts, weights) + moe.shared_experts(x)

    for moe in layers:
        if not torch.equal(picked(moe), routed(moe)):
            raise SystemExit("the picked experts' kernels and MoE._routed differ")
    t_picked = bk.graph_time(lambda: [picked(m) for m in layers], calls=3) / len(layers)
    t_routed = bk.cuda_time(lambda: [routed(m) for m in layers]) / len(layers)
    nbytes = expert_bytes(layers[0], experts)
    return {"rows": experts.shape[0], "distinct_experts": int(experts.unique().numel()), "bytes": nbytes,
            "picked_us": t_picked * 1e6, "of_copy_rate": nbytes / ceil["copy_bytes_per_s"] / t_picked,
            "routed_us": t_routed * 1e6, "routed_over_picked": t_routed / t_picked}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="flash-attn")
    ap.add_argument("--experts", default="8,256", help="routed expert counts (the preset's other shapes kept)")
    ap.add_argument("--layers", type=int, default=6)
    a = ap.parse_args(argv)
    device = bk.DEVICE
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
                 "ceilings": bk.ceilings(), "cases": []}
    print(f"ceilings: HBM copy {res['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s")
    print(f"{'experts':>7} {'case':>10} {'distinct':>8} {'MB':>7} {'picked us':>10} {'%copy':>6} "
          f"{'routed us':>10} {'routed/picked':>13}")
    for E in map(int, a.experts.split(",")):
        cfg = ModelConfig(**{**preset(a.preset).model_dump(), "n_routed_experts": E})
        layers = layers_of(cfg, a.layers, device)
        for name, experts in cases(cfg, device).items():
            r = {"experts": E, "case": name, **run_case(layers, experts, res["ceilings"], device)}
            res["cases"].append(r)
            print(f"{E:>7} {name:>10} {r['distinct_experts']:>8} {r['bytes'] / 1e6:>7.1f} {r['picked_us']:>10.1f} "
                  f"{r['of_copy_rate']:>6.1%} {r['routed_us']:>10.1f} {r['routed_over_picked']:>13.2f}", flush=True)
        del layers
        bk.empty_cache()
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
