"""One request inside the engine: its tokens, sampling state, status and paged state."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .paged_state import PagedRequestState
from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: int
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    state: PagedRequestState | None = None
    finish_reason: str | None = None
    text: str = ""
    decoder: object | None = None  # IncrementalDecoder when the engine has a tokenizer
    preemptions: int = 0
    cached: int = 0  # prompt tokens served from the prefix cache at the last admission
    prefill_only: bool = False  # disaggregated prefill: stop after the first token, hand the state over
    on_chunk: Callable[[object], None] | None = None  # called with the state after each non-final prefill chunk

    _block_keys: list[bytes] | None = None

    def block_keys(self, model_id: str) -> list[bytes]:
        """Prefix-cache keys of the prompt's full blocks (the last token excluded, as in lookups)."""
        if self._block_keys is None:
            from .prefix_cache import block_hashes

            self._block_keys = block_hashes(self.prompt[: len(self.prompt) - 1], model_id)
        return self._block_keys

    @property
    def tokens(self) -> list[int]:
        """Every token whose state must exist before the next sample: prompt, then outputs."""
        return self.prompt + self.output

    @property
    def computed(self) -> int:
        return self.state.num_tokens if self.state is not None else 0

    @property
    def pending(self) -> int:
        """Tokens still to run through the model before the next token can be sampled."""
        return len(self.tokens) - self.computed

    @property
    def prefilling(self) -> bool:
        return self.pending > 1 or not self.output
