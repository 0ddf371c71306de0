"""KV state transfer between two GPUs: against raw NCCL send/recv of the same bytes, and as a share
of time to first token when the state streams while the prefill runs.

    NCCL_NVLS_ENABLE=0 python -m load_tests.bench_transfer [--lengths 8192,32768,131072] [--prefill-upto 131072]

Sender process on GPU 0, receiver on GPU 1 (CUDA_VISIBLE_DEVICES per process), `flash-attn`
preset, compact layout, one PairChannel (gloo headers, NCCL payloads).

1. Whole state: a request state at position P (pool pages hold random bytes: the transfer moves
   bytes, not meaning) goes with kv_transfer.send_state and lands with recv_state (packing,
   device checksums, writing into pages included); then one buffer of the same byte count goes
   over the same NCCL group. Both are timed on the receiver from the moment it tells the sender
   to start (one gloo message, in both timings) until the bytes are in place; median of REPEAT.
2. Streamed: the real prefill of P random tokens on GPU 0 (Engine, chunks of --chunk tokens)
   with the state streaming to GPU 1 (entries after every chunk, the tail at the end; Landing's
   receive loop on the other side). TTFT here is prefill start -> state complete on GPU 1; the
   transfer's share is the part of it after the prefill's first token was sampled. The same
   prefill without streaming is timed too (for P <= --alone-upto), to show what streaming costs it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import socket
import time

REPEAT = 5
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" (gloo only): a smoke run of this script on small lengths


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pools():
    import torch

    from workers.config import preset
    from workers.pools import KVPools, size_pools

    cfg = preset("flash-attn")
    return cfg, KVPools(cfg, size_pools(cfg, 3 << 30, "recompute", 4), layout="compact",
                        dtype=torch.bfloat16, device=DEVICE)


def synthetic_state(pools, P: int):
    """A state at position P whose pages hold random bytes (counts and compressor flags set)."""
    from workers.paged_state import PagedRequestState

    st = PagedRequestState(pools)
    st.prepare_import(P)
    for ls in st.layers:
        for comp in ls.compressors.values():
            comp.n_open = P % ls.ratio
            comp.has_overlap = comp._ov_kv is not None and P >= 4
    for t in (pools.csa_main, pools.csa_index, pools.hca_main, pools.swa):
        t.random_(0, 255)
    pools.comp.normal_()
    return st


def _go(ch, i: int) -> None:
    import torch

    ch.ctrl.send([torch.tensor([i])], ch.peer, 5).wait()


def _await_go(ch) -> None:
    import torch

    ch.ctrl.recv([torch.zeros(1, dtype=torch.int64)], ch.peer, 5).wait()


def receiver(port: int, lengths: list[int], streamed: list[int], q) -> None:
    import threading

    import torch

    from kv_transfer import Landing, PairChannel, recv_state
    from workers.paged_state import PagedRequestState

    cfg, pools = _pools()
    ch = PairChannel("127.0.0.1", port, 1, timeout_s=600, device=DEVICE)
    for P in lengths:
        state_s, raw_s, nbytes = [], [], 0
        for i in range(REPEAT + 1):
            st = PagedRequestState(pools)
            st.prepare_import(P)
            _sync()
            _go(ch, i)
            t = time.perf_counter()
            done = recv_state(ch, f"r{P}-{i}", st)
            _sync()
            dt = time.perf_counter() - t
            st.free()
            nbytes = done["bytes"]
            buf = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
            _sync()
            _go(ch, i)
            t = time.perf_counter()
            ch.data.recv([buf], ch.peer, 3).wait()
            _sync()
            if i:  # the first round warms both paths up
                state_s.append(dt)
                raw_s.append(time.perf_counter() - t)
        q.put({"P": P, "bytes": nbytes, "frames": done["frames"], "transfer_s": sorted(state_s)[REPEAT // 2],
               "raw_nccl_s": sorted(raw_s)[REPEAT // 2]})
    # 2. streamed: from here on the channel belongs to Landing's receive loop
    landing = Landing()
    threading.Thread(target=landing.serve, args=(ch,), daemon=True).start()
    for P in streamed:
        st = PagedRequestState(pools)
        st.prepare_import(P)
        receipt = landing.expect(f"s{P}", st, 600, on_failure=lambda s: None)
        ch.store.set(f"ready{P}", "1")
        done = receipt.result(timeout=900)
        _sync()
        q.put({"P": P, "state_done_at": time.time(), "stream_frames": done["frames"], "stream_bytes": done["bytes"]})
        st.free()
    q.put({"receiver": "done"})


def sender(port: int, lengths: list[int], streamed: list[int], chunk: int, alone_upto: int, q) -> None:
    import torch

    from kv_transfer import ChannelSender, PairChannel, StateStream, finish, send_state
    from workers.engine import Engine, EngineConfig
    from workers.init import random_weights
    from workers.model import V4Model
    from workers.sampling import SamplingParams

    cfg, pools = _pools()
    ch = PairChannel("127.0.0.1", port, 0, timeout_s=600, device=DEVICE)
    for P in lengths:
        for i in range(REPEAT + 1):
            st = synthetic_state(pools, P)
            _sync()
            _await_go(ch)
            nbytes = send_state(ch, f"r{P}-{i}", st)
            st.free()
            buf = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=DEVICE)
            _sync()
            _await_go(ch)
            ch.data.send([buf], ch.peer, 3).wait()
            _sync()
    del pools
    if not streamed:
        q.put({"sender": "done"})
        return
    model = V4Model(cfg, dtype=torch.bfloat16, rounding=True).load_weights(random_weights(cfg, 0)).to(DEVICE)
    eng = Engine(model, EngineConfig(budget_bytes=12 << 30, max_requests=2, prefill_chunk=chunk,
                                     max_batch_tokens=chunk, prefix_cache=False))
    out = ChannelSender(ch)
    greedy = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)  # > 1: the prefill hands its state over
    for P in streamed:
        prompt = torch.randint(2, cfg.vocab_size, (P,), generator=torch.Generator().manual_seed(P)).tolist()
        if P <= alone_upto:  # the same prefill without streaming (also warms the model up)
            _sync()
            t = time.perf_counter()
            eng.add_request(prompt, greedy, request_id=f"alone{P}")
            eng.run()
            q.put({"P": P, "prefill_alone_s": time.perf_counter() - t})
        stream, pending = StateStream(f"s{P}", DEVICE), []

        def on_chunk(state, stream=stream, pending=pending):
            frame = stream.ready_frame(state)
            if frame is not None:
                pending.append(out.submit(frame))

        ch.store.get(f"ready{P}")  # the receiver reserved its pages
        _sync()
        start = time.time()
        rid = eng.add_prefill(prompt, greedy, request_id=f"s{P}", on_chunk=on_chunk)
        first = eng.run()[rid][0]
        prefilled = time.time()
        state, _ = eng.take_handoff(rid)
        finish(out, stream, state, pending, {"first_token": first}, lambda s: s.free())
        q.put({"P": P, "start": start, "prefilled_at": prefilled, "frames_during_prefill": len(pending)})
    q.put({"sender": "done"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--prefill-upto", type=int, default=131072, help="longest prompt of the streamed part")
    ap.add_argument("--alone-upto", type=int, default=32768, help="longest prompt also prefilled without streaming")
    ap.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens)")
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    streamed = [p for p in lengths if p <= a.prefill_upto]
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), _port()
    procs = []
    for gpu, target, args in (("0", sender, (port, lengths, streamed, a.chunk, a.alone_upto, q)),
                              ("1", receiver, (port, lengths, streamed, q))):
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # read by the child at start: one GPU each
        p = ctx.Process(target=target, args=args)
        p.start()
        procs.append(p)
    rows: dict[int, dict] = {}
    ended = 0
    while ended < 2:
        try:
            m = q.get(timeout=5)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"a benchmark process failed (exit codes {dead}); see its traceback above")
            continue
        if "sender" in m or "receiver" in m:
            ended += 1
            continue
        rows.setdefault(m["P"], {}).update(m)
    for p in procs:
        p.join(60)
    print(json.dumps(rows))
    print(f"\n{'prompt':>8} {'MB':>7} {'frames':>6} {'state GB/s':>10} {'raw NCCL GB/s':>13} {'ratio':>6}")
    for P in lengths:
        r = rows[P]
        gbs, raw = r["bytes"] / r["transfer_s"] / 1e9, r["bytes"] / r["raw_nccl_s"] / 1e9
        print(f"{P:>8} {r['bytes'] / 1e6:7.1f} {r['frames']:>6} {gbs:10.2f} {raw:13.2f} {gbs / raw:6.2f}")
    print(f"\n{'prompt':>8} {'prefill alone s':>15} {'prefill streamed s':>18} {'TTFT s':>7} "
          f"{'after prefill ms':>16} {'share of TTFT':>13} {'frames during':>13}")
    for P in streamed:
        r = rows[P]
        ttft = r["state_done_at"] - r["start"]
        tail = r["state_done_at"] - r["prefilled_at"]
        alone = f"{r['prefill_alone_s']:15.2f}" if "prefill_alone_s" in r else f"{'-':>15}"
        print(f"{P:>8} {alone} {r['prefilled_at'] - r['start']:18.2f} {ttft:7.2f} {tail * 1e3:16.1f} "
              f"{tail / ttft:13.2%} {r['frames_during_prefill']:>13}")


if __name__ == "__main__":
    main()
