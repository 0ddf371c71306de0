"""The engine one replica runs: continuous batching over paged state, with chunked prefill,
prefix reuse and preemption.

Each `step()` schedules one forward: first every decoding request (one token each), then prefill
chunks of running requests, then newly admitted ones, up to `max_batch_tokens`. Prefill chunks end
on 256-position block boundaries, so every boundary is reached exactly at a chunk end (where the
prefix cache records blocks and checkpoints). When pages run out the engine evicts unused cached
blocks, then preempts the youngest running request (its pages are freed; it is recomputed later,
through the prefix cache when possible). Admission waits rather than preempting anyone.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .model import V4Model
from .paged_state import PagedRequestState
from .pools import BLOCK, KVPools, OutOfPages, size_pools
from .prefix_cache import POLICIES, PrefixCache
from .sampling import SamplingParams, make_generator, sample
from .sequence import Sequence, Status


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    budget_bytes: int = Field(256 << 20, gt=0)
    policy: str = "checkpoint"
    checkpoint_interval: int = Field(16, ge=1)  # in 256-token blocks
    layout: str = "compact"  # "float": model-dtype entries, for models run without reference rounding
    max_requests: int = Field(16, ge=1)
    max_batch_tokens: int = Field(1024, ge=BLOCK)
    prefill_chunk: int = Field(512, ge=BLOCK)
    max_model_len: int | None = None
    prefix_cache: bool = True

    @model_validator(mode="after")
    def _check(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.prefill_chunk % BLOCK:
            raise ValueError(f"prefill_chunk must be a multiple of {BLOCK}")
        if self.layout not in ("compact", "float"):
            raise ValueError("layout must be 'compact' or 'float'")
        return self


class EngineInputError(ValueError):
    """A request rejected before it took any resource; the message names the problem."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


@dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    extra: dict = field(default_factory=dict)


class Engine:
    def __init__(self, model: V4Model, config: EngineConfig | None = None, tokenizer=None, model_id: str = "v4"):
        self.model, self.cfg, self.config = model, model.cfg, config or EngineConfig()
        c = self.config
        if c.layout == "compact" and not model.rounding:
            raise ValueError("the compact cache layout stores reference-rounded keys (FP8/BF16, FP4): build the "
                             "model with rounding=True, or use layout='float'")
        dtype_bytes = torch.finfo(model.dtype).bits // 8
        # without a prefix cache nothing is kept per cached block: size as `recompute` does
        sizes = size_pools(self.cfg, c.budget_bytes, c.policy if c.prefix_cache else "recompute", c.max_requests,
                           c.checkpoint_interval, c.layout, dtype_bytes)
        self.pools = KVPools(self.cfg, sizes, c.layout, model.dtype, model.head.weight.device)
        self.cache = PrefixCache(self.pools, c.policy, model_id, c.checkpoint_interval) if c.prefix_cache else None
        self.max_model_len = min(c.max_model_len or self.cfg.max_position_embeddings, sizes.blocks * BLOCK)
        self.tokenizer = tokenizer
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._last_batch = 0  # requests in the last forward (0: nothing could be scheduled)
        # prefill-only requests that finished: request id -> (state at the prompt end, sampler)
        self.handoffs: dict[str, tuple[PagedRequestState, torch.Generator | None]] = {}

    # ---- requests -------------------------------------------------------------------------
    def validate(self, prompt: list[int], params: SamplingParams | dict | None = None) -> SamplingParams:
        """Check a request without queueing it; raises EngineInputError naming the problem."""
        try:
            params = params if isinstance(params, SamplingParams) else SamplingParams(**(params or {}))
        except ValidationError as e:
            err = e.errors()[0]
            raise EngineInputError(f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})") from None
        if not prompt:
            raise EngineInputError("prompt is empty")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise EngineInputError(f"prompt has token ids outside [0, {self.cfg.vocab_size})")
        if len(prompt) > self.max_model_len:
            raise EngineInputError(f"prompt has {len(prompt)} tokens; the context limit is {self.max_model_len}")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise EngineInputError(f"max_tokens={params.max_tokens} exceeds the {self.max_model_len - len(prompt)} "
                                   f"positions left after a {len(prompt)}-token prompt")
        if params.stop and self.tokenizer is None:
            raise EngineInputError("stop strings need an engine with a tokenizer")
        return params

    def add_request(self, prompt: list[int], params: SamplingParams | dict | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue; raises EngineInputError before taking any page."""
        prompt = list(prompt)
        params = self.validate(prompt, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise EngineInputError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, prompt, params, arrival=next(self._ids),
                       generator=make_generator(params, self.model.head.weight.device))
        if self.tokenizer is not None:
            from .tokenizer import IncrementalDecoder

            seq.decoder = IncrementalDecoder(self.tokenizer)
        self.seqs[rid] = seq
        self.waiting.append(seq)
        return rid

    def add_prefill(self, prompt: list[int], params: SamplingParams | dict | None = None,
                    request_id: str | None = None, on_chunk: Callable[[PagedRequestState], None] | None = None) -> str:
        """Queue a disaggregated prefill: it ends after its first token with finish_reason
        "prefilled", and its state waits in `handoffs` for the transfer (then `take_handoff`).
        on_chunk(state) runs on the engine's thread after each prefill chunk but the last, so the
        entries that chunk closed can leave while the next one computes. It must not raise (it
        would fail the whole batch): a callback keeps its own errors for the caller."""
        rid = self.add_request(prompt, params, request_id)
        self.seqs[rid].prefill_only = True
        self.seqs[rid].on_chunk = on_chunk
        return rid

    def take_handoff(self, request_id: str) -> tuple[PagedRequestState, torch.Generator | None]:
        """The state and sampler of a finished prefill; the caller frees the state once it is sent."""
        return self.handoffs.pop(request_id)

    def new_import_state(self, num_tokens: int) -> PagedRequestState:
        """Pages for a state arriving from a prefill replica (raises OutOfPages when full)."""
        state = PagedRequestState(self.pools, keep_all_window=self.config.policy == "full_store")
        try:
            state.prepare_import(num_tokens)
        except OutOfPages:
            state.free()
            raise
        return state

    def add_imported(self, prompt: list[int], params: SamplingParams | dict | None, first_token: int,
                     state: PagedRequestState, request_id: str | None = None,
                     generator: torch.Generator | None = None) -> RequestOutput:
        """Continue a request prefilled elsewhere: `state` holds its prompt's state and
        `first_token` was sampled there. Returns the first token's output; decoding goes on in step()."""
        prompt = list(prompt)
        params = self.validate(prompt, params)
        if state.num_tokens != len(prompt):
            state.free()
            raise EngineInputError(f"imported state is at {state.num_tokens} tokens; the prompt has {len(prompt)}")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        seq = Sequence(rid, prompt, params, arrival=next(self._ids),
                       generator=generator if generator is not None else make_generator(params, self.model.head.weight.device))
        if self.tokenizer is not None:
            from .tokenizer import IncrementalDecoder

            seq.decoder = IncrementalDecoder(self.tokenizer)
        seq.state, seq.status = state, Status.RUNNING
        self.seqs[rid] = seq
        self.running.append(seq)
        return self._accept(seq, first_token)

    def release(self, request_id: str) -> None:
        """Forget a finished request (its record, not its cached prefix)."""
        seq = self.seqs.get(request_id)
        if seq is not None and seq.status == Status.FINISHED:
            del self.seqs[request_id]

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its pages are freed at once. False if it is unknown or already done."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.status == Status.FINISHED:
            return False
        self._finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self._schedule()
        self._last_batch = len(batch)
        if not batch:
            return []
        self.stats.steps += 1
        chunks = [(seq.state, seq.tokens[seq.computed : seq.computed + n]) for seq, n in batch]
        for seq, n in batch:
            if seq.prefilling:
                self.stats.prefill_tokens += n
            else:
                self.stats.decode_tokens += n
        logits = self.model(chunks)
        picks = []
        for (seq, n), lg in zip(batch, logits):
            st = seq.state
            if self.cache is not None and st.replay_end is None:
                self.cache.on_progress(st, seq.tokens, len(seq.prompt))
            st.release_old_window()
            if seq.pending == 0:
                picks.append((seq, lg))
            elif seq.on_chunk is not None:
                seq.on_chunk(st)
        return [self._accept(seq, tok) for (seq, _), tok in zip(picks, self._sample_tokens(picks))]

    def run(self) -> dict[str, list[int]]:
        """Step until every queued request finishes; returns output token ids per request."""
        while self.has_unfinished():
            self.step()
            if self._last_batch == 0:
                raise RuntimeError("no request can be scheduled: the pools are too small for what is queued")
        return {rid: s.output for rid, s in self.seqs.items()}

    # ---- scheduling ---------------------------------------------------------------------------
    def _schedule(self) -> list[tuple[Sequence, int]]:
        batch: list[tuple[Sequence, int]] = []
        budget = self.config.max_batch_tokens
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.prefilling or seq.status != Status.RUNNING:
                continue
            if self._reserve(seq, 1, preempt=True):
                batch.append((seq, 1))
                budget -= 1
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if not seq.prefilling or budget <= 0:
                continue
            n = self._chunk(seq, budget)
            if n == 0 or not self._reserve(seq, n, preempt=False):
                break
            batch.append((seq, n))
            budget -= n
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and self.pools.comp_pool.num_free > 0:
            seq = self.waiting[0]
            if self._prefix_in_flight(seq):
                deferred.append(self.waiting.popleft())
                continue
            seq.state = PagedRequestState(self.pools, keep_all_window=self.config.policy == "full_store")
            resume = self.cache.lookup(seq.tokens) if self.cache is not None else None
            if resume is not None:
                self.cache.attach(seq.state, resume)
            n = self._chunk(seq, budget)
            if n == 0 or not self._reserve(seq, n, preempt=False):
                seq.state.free()
                seq.state = None
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            seq.cached = resume.matched if resume else 0
            if resume is not None:
                self.cache.count_hit(resume)
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        return batch

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """True when a running request is still prefilling blocks this one would reuse: waiting for
        it turns a duplicate prefill into a cache hit."""
        if self.cache is None:
            return False
        keys = seq.block_keys(self.cache.model_id)
        cached = next((i for i, k in enumerate(keys) if k not in self.cache.blocks), len(keys))
        for other in self.running:
            if not other.prefilling or other.state is None:
                continue
            theirs = other.block_keys(self.cache.model_id)
            shared = next((i for i, (a, b) in enumerate(zip(keys, theirs)) if a != b), min(len(keys), len(theirs)))
            if shared > cached and other.computed < shared * BLOCK:
                return True
        return False

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens of the next prefill chunk: up to the budget, ending on a block boundary unless it
        reaches the end of what is pending (or of a replay)."""
        start, st = seq.computed, seq.state
        limit = len(seq.tokens) if st.replay_end is None else st.replay_end
        capture = self.cache.next_capture(start, len(seq.prompt)) if self.cache is not None else None
        if capture is not None and st.replay_end is None:
            limit = min(limit, capture)
        end = min(limit, start + min(budget, self.config.prefill_chunk))
        if end < limit:
            end = (end // BLOCK) * BLOCK
        return max(0, end - start)

    def _reserve(self, seq: Sequence, n: int, preempt: bool) -> bool:
        """Pages for n more tokens of seq: evict cached blocks, then (if allowed) preempt the
        youngest running requests. False when seq has to wait (or was itself preempted)."""
        while True:
            try:
                seq.state.reserve(n)
                return True
            except OutOfPages:
                need_b, need_s = seq.state.pages_needed(n)
                if self.cache is not None and self.cache.evict(blocks=need_b, swa=need_s):
                    continue
                if not preempt:
                    return False
                victim = max((s for s in self.running if s.status == Status.RUNNING), key=lambda s: s.arrival)
                self._preempt(victim)
                if victim is seq:
                    return False

    def _preempt(self, seq: Sequence) -> None:
        seq.state.free()
        seq.state = None
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    # ---- sampling and stopping ------------------------------------------------------------------
    def _sample_tokens(self, picks: list[tuple[Sequence, torch.Tensor]]) -> list[int]:
        """One token per (sequence, logits [V]). The greedy ones come from one argmax over their
        stacked logits: one wait for the device per step instead of one per request (the same
        token: argmax returns the first maximum either way). The others are drawn by sample()
        with each request's own generator."""
        greedy = [i for i, (seq, _) in enumerate(picks) if seq.params.greedy]
        tokens: list[int | None] = [None] * len(picks)
        if greedy:
            best = torch.stack([picks[i][1] for i in greedy]).argmax(-1).tolist()
            for i, tok in zip(greedy, best):
                tokens[i] = tok
        for i, (seq, lg) in enumerate(picks):
            if tokens[i] is None:
                tokens[i] = sample(lg, seq.params, seq.generator)
        return tokens

    def _accept(self, seq: Sequence, tok: int) -> RequestOutput:
        """Append a sampled token, stream it, and end the request on a stop condition."""
        p = seq.params
        seq.output.append(tok)
        reason, before = None, len(seq.text)
        if tok in p.stop_token_ids or (tok == self.cfg.eos_token_id and not p.ignore_eos):
            reason = "stop"
        else:
            if seq.decoder is not None:
                seq.text += seq.decoder.feed(tok)
                hits = [seq.text.index(s) for s in p.stop if s in seq.text]
                if hits:
                    seq.text, reason = seq.text[: min(hits)], "stop"
            if reason is None and len(seq.output) >= p.max_tokens:
                reason = "length"
        if reason is None and seq.prefill_only:
            reason = "prefilled"
        out = RequestOutput(seq.request_id, [tok], seq.text[before:], reason is not None, reason,
                            len(seq.prompt), len(seq.output), seq.cached)
        if reason is not None:
            self._finish(seq, reason)
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.state is not None and reason == "prefilled":
            self.handoffs[seq.request_id] = (seq.state, seq.generator)  # the caller ships it, then frees it
        elif seq.state is not None:
            seq.state.free()
        seq.state = None
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    # ---- accounting -----------------------------------------------------------------------------
    def pages_in_use(self) -> dict[str, int]:
        """Pages held by something other than the prefix cache (0 everywhere when idle)."""
        held = {p.name: 0 for p in self.pools.all_pools()}
        if self.cache is not None:
            for blk in self.cache.blocks.values():
                held["blocks"] += 1
                held["swa"] += len(blk.window)
                held["overlap"] += blk.overlap is not None
        return {p.name: p.num_pages - p.num_free - held[p.name] for p in self.pools.all_pools()}
