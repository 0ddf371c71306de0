"""KV state transfer between two GPUs against raw NCCL send/recv of the same bytes, same run.

    NCCL_NVLS_ENABLE=0 python -m load_tests.bench_transfer [--lengths 8192,32768,131072] [--prefill-upto 32768]

Prefill side on cuda:0, decode side on cuda:1, `flash-attn` preset, compact layout. For each
prompt length P: a request state at position P (pool pages filled with random bytes: the transfer
moves bytes, not meaning) is sent with kv_transfer.send_state and landed with recv_state, timed on
the receiver; then one buffer of the same byte count goes over the same NCCL group, timed the
same way. For lengths up to --prefill-upto the real prefill of P tokens is timed on cuda:0 too,
giving the transfer's share of time to first token.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import time

import torch

REPEAT = 5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pools(device: str):
    from workers.config import preset
    from workers.pools import KVPools, size_pools

    cfg = preset("flash-attn")
    return cfg, KVPools(cfg, size_pools(cfg, 2 << 30, "recompute", 4), layout="compact",
                        dtype=torch.bfloat16, device=device)


def _synthetic_state(pools, P: int):
    """A state at position P whose pages hold random bytes (counts and compressor flags set)."""
    from workers.paged_state import PagedRequestState

    st = PagedRequestState(pools)
    st.prepare_import(P)
    for ls in st.layers:
        for f in ls.families():
            ls.count[f] = P // ls.ratio
        for comp in ls.compressors.values():
            comp.n_open = P % ls.ratio
            comp.has_overlap = comp._ov_kv is not None and P >= 4
    for t in (pools.csa_main, pools.csa_index, pools.hca_main, pools.swa):
        t.random_(0, 255)
    pools.comp.normal_()
    return st


def _sync():
    torch.cuda.synchronize()


def receiver(port: int, lengths: list[int], q) -> None:
    from kv_transfer import PairChannel, recv_state
    from workers.paged_state import PagedRequestState

    torch.cuda.set_device(1)
    cfg, pools = _pools("cuda:1")
    ch = PairChannel("127.0.0.1", port, 0, timeout_s=300, device="cuda")
    for P in lengths:
        state_s, raw_s, nbytes = [], [], 0
        for i in range(REPEAT + 1):
            st = PagedRequestState(pools)
            st.prepare_import(P)
            _sync()
            t = time.perf_counter()
            done = recv_state(ch, f"r{P}-{i}", st)
            _sync()
            dt = time.perf_counter() - t
            st.free()
            nbytes = done["bytes"]
            buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
            _sync()
            t = time.perf_counter()
            ch.data.recv([buf], 1, 3).wait()
            _sync()
            if i:  # the first round warms both paths up
                state_s.append(dt)
                raw_s.append(time.perf_counter() - t)
        q.put({"P": P, "bytes": nbytes, "transfer_s": sorted(state_s)[len(state_s) // 2],
               "raw_nccl_s": sorted(raw_s)[len(raw_s) // 2]})


def sender(port: int, lengths: list[int], prefill_upto: int, q) -> None:
    from kv_transfer import PairChannel, send_state

    torch.cuda.set_device(0)
    cfg, pools = _pools("cuda:0")
    ch = PairChannel("127.0.0.1", port, 1, timeout_s=300, device="cuda")
    for P in lengths:
        for i in range(REPEAT + 1):
            st = _synthetic_state(pools, P)
            _sync()
            send_state(ch, f"r{P}-{i}", st)
            nbytes = sum(t.numel() * t.element_size() for layer in range(len(st.layers)) for _, t in st.export_layer(layer))
            st.free()
            buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
            _sync()
            ch.data.send([buf], 0, 3).wait()
    if prefill_upto:
        from workers.engine import Engine, EngineConfig
        from workers.init import random_weights
        from workers.model import V4Model
        from workers.sampling import SamplingParams

        model = V4Model(cfg, dtype=torch.bfloat16, rounding=True).load_weights(random_weights(cfg, 0)).to("cuda:0")
        for P in [p for p in lengths if p <= prefill_upto]:
            eng = Engine(model, EngineConfig(budget_bytes=8 << 30, max_requests=2, prefill_chunk=2048,
                                             max_batch_tokens=2048, prefix_cache=False))
            prompt = torch.randint(2, cfg.vocab_size, (P,)).tolist()
            _sync()
            t = time.perf_counter()
            eng.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
            eng.run()
            _sync()
            q.put({"P": P, "prefill_s": time.perf_counter() - t})
    q.put({"sender": "done"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--prefill-upto", type=int, default=32768)
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), _port()
    procs = [ctx.Process(target=receiver, args=(port, lengths, q)),
             ctx.Process(target=sender, args=(port, lengths, a.prefill_upto, q))]
    for p in procs:
        p.start()
    rows: dict[int, dict] = {}
    done = 0
    while done < 2:
        m = q.get(timeout=1800)
        if m.get("sender") == "done":
            done += 1
            continue
        rows.setdefault(m["P"], {}).update(m)
        if "transfer_s" in m and m["P"] == lengths[-1]:
            done += 1
    for p in procs:
        p.join(60)
    print(json.dumps(rows))
    print(f"\n{'prompt':>8} {'MB':>8} {'state GB/s':>11} {'raw NCCL GB/s':>14} {'ratio':>6} {'prefill s':>10} {'share TTFT':>11}")
    for P in lengths:
        r = rows[P]
        gbs, raw = r["bytes"] / r["transfer_s"] / 1e9, r["bytes"] / r["raw_nccl_s"] / 1e9
        pre = r.get("prefill_s")
        share = f"{r['transfer_s'] / (pre + r['transfer_s']):11.2%}" if pre else f"{'-':>11}"
        pre_s = f"{pre:10.2f}" if pre else f"{'-':>10}"
        print(f"{P:>8} {r['bytes'] / 1e6:8.1f} {gbs:11.2f} {raw:14.2f} {gbs / raw:6.2f} {pre_s} {share}")


if __name__ == "__main__":
    main()
