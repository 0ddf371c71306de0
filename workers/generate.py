"""Single-request generation on one state: prefill, then decode until a stop condition.

The engine (continuous batching) will run many of these at once; this loop is what the CLI and
the tests use, and the behaviour the engine must reproduce token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .model import V4Model
from .sampling import SamplingParams, make_generator, sample
from .state import RequestState


@dataclass
class Step:
    token_id: int
    finish_reason: str | None  # None while running, then "stop" or "length"


def generate_ids(model: V4Model, prompt_ids: list[int], params: SamplingParams,
                 state: RequestState | None = None, chunk: int = 256) -> Iterator[Step]:
    """Yield sampled token ids; the last Step carries the finish reason. Stop strings are the
    caller's business (they need text); stop token ids and EOS end generation here."""
    if not prompt_ids:
        raise ValueError("prompt is empty")
    state = state or model.new_state()
    room = model.cfg.max_position_embeddings - state.num_tokens - len(prompt_ids)
    if params.max_tokens > room:
        raise ValueError(f"max_tokens={params.max_tokens} exceeds the {room} positions left in the context")
    gen = make_generator(params, model.head.weight.device)
    for i in range(0, len(prompt_ids), chunk):
        logits = model([(state, prompt_ids[i : i + chunk])])[0]
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {model.cfg.eos_token_id})
    for n in range(1, params.max_tokens + 1):
        tok = sample(logits, params, gen)
        if tok in stops:
            yield Step(tok, "stop")
            return
        if n == params.max_tokens:
            yield Step(tok, "length")
            return
        yield Step(tok, None)
        logits = model([(state, [tok])])[0]
