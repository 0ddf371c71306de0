"""The per-request inference state of a V4 model, explicit and serialisable.

Per layer (v4-architecture.md §6.2, §7):
  * `window`  [<= W-1, D]: keys of the last W-1 positions, oldest first (the sliding window of the
    next query is these plus its own key);
  * `entries` family -> [n, width]: append-only compressed entries, "main" (CSA/HCA, width D)
    and "index" (CSA lightning-indexer keys, width index_head_dim);
  * `compressors` name -> CompressorState: the open window (T mod m tokens, FP32 kv + biased
    score) and, for CSA, the overlap (A-halves of the last complete window).
Nothing else carries across tokens, so a forward call that reads and appends to this object is
exact under any chunking, and the object can be shipped or stored at any position.

Snapshots are a msgpack header followed by the raw tensor bytes (never pickle).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import torch

from .config import CSA, HCA, ModelConfig

SNAPSHOT_VERSION = 1
_MAGIC = b"V4ST"


class SnapshotError(ValueError):
    """A snapshot that does not match the model or is corrupt."""


class GrowingRows:
    """An append-only [n, width] tensor with amortised O(1) appends (capacity doubles)."""

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self._buf = torch.empty(0, width, dtype=dtype, device=device)
        self.n = 0

    def append(self, rows: torch.Tensor) -> None:
        need = self.n + rows.shape[0]
        if need > self._buf.shape[0]:
            grown = torch.empty(max(need, 2 * self._buf.shape[0], 16), self._buf.shape[1],
                                dtype=self._buf.dtype, device=self._buf.device)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : need] = rows
        self.n = need

    def view(self) -> torch.Tensor:
        return self._buf[: self.n]


@dataclass
class CompressorState:
    """Cross-token state of one compressor. Scores already include the position bias (ape)."""

    open_kv: torch.Tensor  # [T mod m, c*width] float32
    open_score: torch.Tensor  # [T mod m, c*width] float32
    overlap_kv: torch.Tensor | None = None  # CSA: [m, width] A-halves of the last complete window
    overlap_score: torch.Tensor | None = None

    # The compressor writes through these (the paged state's slot implements the same three).
    def set_open(self, kv: torch.Tensor, score: torch.Tensor) -> None:
        self.open_kv, self.open_score = kv, score

    def set_overlap(self, kv: torch.Tensor | None, score: torch.Tensor | None) -> None:
        self.overlap_kv, self.overlap_score = kv, score

    def copy_from(self, other: "CompressorState") -> None:
        self.set_open(other.open_kv, other.open_score)
        self.set_overlap(other.overlap_kv, other.overlap_score)


class LayerState:
    """One layer's state, as the model reads and appends it (the paged state has the same methods)."""

    def __init__(self, window: torch.Tensor):
        self._window = window
        self._entries: dict[str, GrowingRows] = {}
        self.compressors: dict[str, CompressorState] = {}

    def window(self) -> torch.Tensor:
        """Keys of the positions before the current one that a query may still see, oldest first."""
        return self._window

    def push_window(self, keys: torch.Tensor, window: int) -> None:
        self._window = torch.cat([self._window, keys])[-(window - 1) :].clone()

    def entries(self, family: str) -> torch.Tensor:
        return self._entries[family].view()

    def append_entries(self, family: str, rows: torch.Tensor) -> None:
        self._entries[family].append(rows)

    def families(self) -> list[str]:
        return list(self._entries)


class RequestState:
    """Everything a V4 model needs to continue one sequence at position `num_tokens`."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.num_tokens = 0
        # Positions below replay_end already have their compressed entries (a prefix-cache hit
        # being rebuilt): the forward recomputes only window state there (see Attention).
        self.replay_end: int | None = None
        self.layers: list[LayerState] = []
        for ratio in cfg.compress_ratios:
            ls = LayerState(torch.empty(0, cfg.head_dim, dtype=dtype, device=device))
            if ratio in (CSA, HCA):
                ls._entries["main"] = GrowingRows(cfg.head_dim, dtype, device)
                ls.compressors["main"] = empty_compressor(ratio, cfg.head_dim, device)
            if ratio == CSA:
                ls._entries["index"] = GrowingRows(cfg.index_head_dim, dtype, device)
                ls.compressors["index"] = empty_compressor(ratio, cfg.index_head_dim, device)
            self.layers.append(ls)

    # ---- snapshot ------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Header (msgpack) + tensor payload. Layout: MAGIC, u32 header length, header, payload."""
        tensors: list[torch.Tensor] = []

        def ref(t: torch.Tensor | None):
            if t is None:
                return None
            tensors.append(t.detach().contiguous().cpu())
            return len(tensors) - 1

        layers = []
        for ls in self.layers:
            layers.append({
                "window": ref(ls.window()),
                "entries": {k: ref(ls.entries(k)) for k in ls.families()},
                "compressors": {
                    k: [ref(c.open_kv), ref(c.open_score), ref(c.overlap_kv), ref(c.overlap_score)]
                    for k, c in ls.compressors.items()
                },
            })
        descs, offset = [], 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            descs.append({"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset, "nbytes": nbytes})
            offset += nbytes
        header = msgpack.packb({
            "version": SNAPSHOT_VERSION,
            "model": self.cfg.model_dump(mode="json", exclude={"name"}),
            "num_tokens": self.num_tokens,
            "layers": layers,
            "tensors": descs,
        })
        payload = b"".join(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"" for t in tensors)
        return _MAGIC + len(header).to_bytes(4, "little") + header + payload

    @classmethod
    def from_bytes(cls, data: bytes, cfg: ModelConfig, dtype: torch.dtype | None = None,
                   device: torch.device | str = "cpu") -> "RequestState":
        if data[:4] != _MAGIC or len(data) < 8:
            raise SnapshotError("not a v4serve state snapshot (bad magic)")
        hlen = int.from_bytes(data[4:8], "little")
        try:
            header = msgpack.unpackb(data[8 : 8 + hlen])
        except Exception as e:  # msgpack raises several unrelated types for corrupt input
            raise SnapshotError(f"corrupt snapshot header: {e}") from None
        if header.get("version") != SNAPSHOT_VERSION:
            raise SnapshotError(f"snapshot version {header.get('version')} != {SNAPSHOT_VERSION}")
        if header["model"] != cfg.model_dump(mode="json", exclude={"name"}):
            raise SnapshotError("snapshot was taken with a different model config")
        payload = memoryview(data)[8 + hlen :]
        tensors = []
        for d in header["tensors"]:
            if d["offset"] + d["nbytes"] > len(payload):
                raise SnapshotError("snapshot payload is truncated")
            chunk = bytearray(payload[d["offset"] : d["offset"] + d["nbytes"]])
            raw = torch.frombuffer(chunk, dtype=torch.uint8) if chunk else torch.empty(0, dtype=torch.uint8)
            tensors.append(raw.view(getattr(torch, d["dtype"])).reshape(d["shape"]).to(device))

        def get(i):
            return None if i is None else tensors[i]

        first_window = get(header["layers"][0]["window"]) if header["layers"] else None
        state = cls(cfg, dtype=dtype or (first_window.dtype if first_window is not None else torch.float32), device=device)
        state.num_tokens = header["num_tokens"]
        for ls, h in zip(state.layers, header["layers"], strict=True):
            ls._window = get(h["window"]).to(state.dtype)
            for k, i in h["entries"].items():
                ls.append_entries(k, get(i).to(state.dtype))
            for k, (a, b, c, d) in h["compressors"].items():
                ls.compressors[k] = CompressorState(get(a), get(b), get(c), get(d))
        state.check()
        return state

    def check(self) -> None:
        """Raise SnapshotError if the per-layer sizes contradict num_tokens."""
        T, W = self.num_tokens, self.cfg.sliding_window
        for i, (ls, ratio) in enumerate(zip(self.layers, self.cfg.compress_ratios)):
            if ls.window().shape[0] != min(T, W - 1):
                raise SnapshotError(f"layer {i}: window has {ls.window().shape[0]} keys, expected {min(T, W - 1)}")
            for fam in ls.families():
                n = ls.entries(fam).shape[0]
                if n != T // ratio:
                    raise SnapshotError(f"layer {i}: {n} {fam} entries, expected {T // ratio}")
            for name, c in ls.compressors.items():
                if c.open_kv.shape[0] != T % ratio:
                    raise SnapshotError(f"layer {i}: {name} compressor holds {c.open_kv.shape[0]} open tokens, expected {T % ratio}")


def empty_compressor(ratio: int, width: int, device) -> CompressorState:
    c = 2 if ratio == CSA else 1
    empty = torch.empty(0, c * width, dtype=torch.float32, device=device)
    return CompressorState(open_kv=empty, open_score=empty.clone())
