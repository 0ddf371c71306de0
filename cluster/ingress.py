"""The HTTP front (FastAPI through Ray Serve): OpenAI-compatible routes over the engine replicas.

It parses and checks requests, applies the chat template, tokenizes, and streams the replica's
outputs back as the OpenAI body or as server-sent events. Every failure is an OpenAI error body
with the matching status: 400 bad request, 404 unknown model, 429 at capacity, 503 no replica.
"""


import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from . import openai_api as oa
from .metrics import IngressMetrics
from .profiles import EndpointProfile

app = FastAPI(title="v4serve")


class _Refused(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        self.status, self.body = status, oa.error_body(message, kind, param, code)


def _error(e: _Refused, metrics: "IngressMetrics") -> JSONResponse:
    metrics.error(e.status)
    return JSONResponse(e.body, status_code=e.status)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, engine: DeploymentHandle, profile: dict, prefill: DeploymentHandle | None = None):
        """engine: the replicas that decode (and prefill, unless a prefill group is given)."""
        from workers.loader import load_tokenizer
        from workers.tokenizer import EOS_TEXT

        self.engine, self.prefill = engine, prefill
        self.profile = EndpointProfile(**profile)
        self.cfg, self.tokenizer = load_tokenizer(self.profile.model)
        self.metrics = IngressMetrics(self.profile.model_name)
        self.eos_text = EOS_TEXT

    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.profile.model_name, "object": "model", "owned_by": "v4serve",
                                            "max_model_len": self.profile.max_context}]}

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        arrived = time.monotonic()
        try:
            req = await self._parse(request, oa.CompletionRequest)
            ids = req.prompt if isinstance(req.prompt, list) else self.tokenizer.encode(req.prompt)
            return await self._serve(req, ids, False, arrived)
        except _Refused as e:
            return _error(e, self.metrics)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        arrived = time.monotonic()
        try:
            req = await self._parse(request, oa.ChatRequest)
            try:
                text = oa.chat_prompt(req.messages, self.eos_text)
            except ValueError as e:
                raise _Refused(400, str(e), param="messages") from None
            ids = self.tokenizer.encode(text, add_bos=True)
            return await self._serve(req, ids, True, arrived)
        except _Refused as e:
            return _error(e, self.metrics)

    # ---- helpers ----------------------------------------------------------------------------
    async def _parse(self, request: Request, schema):
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Refused(400, "the request body is not valid JSON") from None
        try:
            req = schema.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            param = ".".join(map(str, err["loc"])) or None
            raise _Refused(400, f"{param}: {err['msg']}", param=param) from None
        if req.model != self.profile.model_name:
            raise _Refused(404, f"model {req.model!r} does not exist; this endpoint serves {self.profile.model_name!r}",
                           param="model", code="model_not_found")
        return req

    async def _serve(self, req, ids: list[int], chat: bool, arrived: float):
        try:
            params = req.sampling(self.profile.default_max_tokens).model_dump()
        except ValidationError as e:
            err = e.errors()[0]
            raise _Refused(400, f"{err['loc'][0]}: {err['msg']}", param=str(err["loc"][0])) from None
        request = {"prompt_ids": ids, "params": params}
        if self.prefill is not None and len(ids) > self.profile.local_prefill_max_tokens:
            # a prefill or transfer that failed (lost replica, time-out) is redone on the decode side
            request = await self._prefill_elsewhere(ids, params) or request
        if "finished" in request:  # done on its first token at the prefill replica
            stream = _Single(request["finished"])
        else:
            stream = self.engine.options(stream=True).generate.remote(request)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise _Refused(503, "the engine ended the request without output", "server_error") from None
        except Exception as e:  # replica died or unreachable
            raise _Refused(503, f"no engine replica could serve the request: {type(e).__name__}", "server_error") from None
        if "error" in first:
            kind = "invalid_request_error" if first["status"] == 400 else "rate_limit_error"
            raise _Refused(first["status"], first["error"], kind)
        self.metrics.first_token(time.monotonic() - arrived)
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        model = self.profile.model_name
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._sse(rid, model, first, stream, chat, include_usage),
                                     media_type="text/event-stream")
        text, last = first["text"], first
        async for out in stream:
            text, last = text + out["text"], out
        use = oa.usage(last["prompt_tokens"], last["output_tokens"], last["cached_tokens"])
        body = (oa.chat_body if chat else oa.completion_body)(rid, model, text, last["finish_reason"], use)
        return JSONResponse(body)

    async def _prefill_elsewhere(self, ids: list[int], params: dict) -> dict:
        """Reserve pages on a decode replica, have a prefill replica compute and stream the state
        there; answers the decode request to send, the finished output, or None when the prefill
        side failed (the caller prefills on the decode side instead)."""
        try:
            slot = await self.engine.reserve.remote({"num_tokens": len(ids), "prompt_ids": ids})
        except Exception as e:
            raise _Refused(503, f"no decode replica could take the request: {type(e).__name__}", "server_error") from None
        if "error" in slot:
            raise _Refused(slot["status"], slot["error"], "server_error")
        cancel = {"ticket": slot["ticket"], "replica": slot["replica"]}
        try:
            done = await self.prefill.prefill.remote({"prompt_ids": ids, "params": params, "dest": slot})
        except asyncio.CancelledError:  # the client left: give the decode pages back now
            self.engine.cancel_reservation.remote(cancel)
            raise
        except Exception as e:
            done = {"error": f"the prefill replica failed: {type(e).__name__}", "status": 503}
        if "error" in done or "finished" in done:
            await self.engine.cancel_reservation.remote(cancel)
        if "error" in done:
            if done["status"] == 503:
                return None
            raise _Refused(done["status"], done["error"], "invalid_request_error" if done["status"] == 400 else "server_error")
        if "finished" in done:
            return done
        return {"prompt_ids": ids, "params": params, "ticket": slot["ticket"], "replica": slot["replica"],
                "first_token": done["first_token"], "generator_state": done["generator_state"]}

    async def _sse(self, rid, model, first, stream, chat, include_usage):
        obj = "chat.completion.chunk" if chat else "text_completion"
        out, is_first = first, True
        try:
            while True:
                if chat:
                    yield oa.sse(oa.chat_chunk(rid, model, out["text"], out["finish_reason"], first=is_first))
                else:
                    yield oa.sse(oa.completion_chunk(rid, model, out["text"], out["finish_reason"]))
                is_first = False
                if out["finished"]:
                    break
                out = await stream.__anext__()
            if include_usage:
                use = oa.usage(out["prompt_tokens"], out["output_tokens"], out["cached_tokens"])
                yield oa.sse(oa.usage_chunk(rid, model, obj, use))
            yield oa.sse("[DONE]")
        except StopAsyncIteration:
            yield oa.sse(oa.error_body("the engine ended the stream early", "server_error"))
        except Exception as e:  # replica lost mid-stream: end this request cleanly, say why
            yield oa.sse(oa.error_body(f"the request failed: {type(e).__name__}", "server_error"))
        finally:
            stream.cancel()  # client gone or finished: the replica aborts and frees the pages


class _Single:
    """A one-output stream (a request that finished on its prefill replica)."""

    def __init__(self, out: dict):
        self.out = out

    async def __anext__(self):
        if self.out is None:
            raise StopAsyncIteration
        out, self.out = self.out, None
        return out

    def __aiter__(self):
        return self

    def cancel(self) -> None:
        pass
