"""The two sides of a state transfer, each run in its own process by tests/test_kv_transfer.py."""

import torch

from kv_transfer import PairChannel, TransferError, recv_state, send_state
from model_configs import TINY
from workers.init import random_weights
from workers.model import V4Model
from workers.paged_state import PagedRequestState
from workers.pools import KVPools, size_pools


def _side():
    model = V4Model(TINY, rounding=True).load_weights(random_weights(TINY, 0))
    pools = KVPools(TINY, size_pools(TINY, 32 << 20, "recompute", 2), layout="compact")
    return model, pools


def prefill_and_send(port: int, prompt: list[int], q) -> None:
    """Prefill in 256-token chunks into paged state, sample the first token, send the state."""
    model, pools = _side()
    st = PagedRequestState(pools)
    for i in range(0, len(prompt), 256):
        chunk = prompt[i : i + 256]
        st.reserve(len(chunk))
        logits = model([(st, chunk)])[0]
        st.release_old_window()
    ch = PairChannel("127.0.0.1", port, 0, timeout_s=60)
    sent = send_state(ch, "r1", st, extra={"first_token": int(logits.argmax())})
    q.put(("prefill", sent))


def receive_and_decode(port: int, num_tokens: int, steps: int, q, timeout_s: float = 3) -> None:
    model, pools = _side()
    st = PagedRequestState(pools)
    st.prepare_import(num_tokens)
    try:
        # joining may take long on a loaded machine; the receive is what timeout_s bounds
        ch = PairChannel("127.0.0.1", port, 1, timeout_s=timeout_s, open_timeout_s=120)
        done = recv_state(ch, "r1", st)
    except TransferError as e:
        free = all(p.num_free == p.num_pages for p in pools.all_pools())
        q.put(("error", str(e), free))
        return
    toks, nxt = [], done["first_token"]
    for _ in range(steps):
        toks.append(nxt)
        st.reserve(1)
        nxt = int(model([(st, [nxt])])[0].argmax())
        st.release_old_window()
    q.put(("decode", toks))


def silent_sender(port: int, q) -> None:
    """Opens the channel, then never sends: the receiver must time out and free its pages."""
    import time

    PairChannel("127.0.0.1", port, 0, timeout_s=30, open_timeout_s=120)
    q.put(("silent", True))
    time.sleep(20)


def join_and_die(port: int, q) -> None:
    """Joins the channel, then its process ends: the sender must fail and free its pages."""
    PairChannel("127.0.0.1", port, 1, timeout_s=30)
    q.put(("joined", True))
