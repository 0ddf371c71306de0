"""The `v4serve` command."""

from __future__ import annotations

import argparse
import sys

from . import capacity_cmd

DTYPES = ("float32", "bfloat16", "float16")


def _generate(args: argparse.Namespace) -> int:
    import torch
    from pydantic import ValidationError

    from workers.generate import generate_ids
    from workers.loader import load_model
    from workers.sampling import SamplingParams
    from workers.tokenizer import IncrementalDecoder

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
    except ValidationError as e:
        err = e.errors()[0]
        print(f"v4serve generate: --{err['loc'][0].replace('_', '-')}: {err['msg']} (got {err['input']!r})", file=sys.stderr)
        return 2
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device,
                            rounding=args.reference_rounding)
    ids = tok.encode(args.prompt, add_bos=args.bos)
    if not ids:
        print("v4serve generate: the prompt is empty", file=sys.stderr)
        return 2
    decoder, text = IncrementalDecoder(tok), ""
    for step in generate_ids(model, ids, params):
        if step.finish_reason == "stop":  # EOS or a stop token id: not part of the text
            break
        text += decoder.feed(step.token_id)
        hit = [s for s in params.stop if s in text]
        if hit:
            sys.stdout.write(text[: min(text.index(s) for s in hit)] + "\n")
            return 0
    sys.stdout.write(text + decoder.flush() + "\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import time

    import ray
    from ray import serve

    from .app import build_app
    from .profiles import EndpointProfile, ProfileError, bundled

    try:
        profile = EndpointProfile.from_yaml(args.config) if args.config else bundled(args.profile, model=args.model)
    except ProfileError as e:
        print(f"v4serve serve: {e}", file=sys.stderr)
        return 2
    ray.init(include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(profile), name="v4serve", route_prefix="/")
    print(f"v4serve: profile {profile.name!r}, model {profile.model_name!r} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="v4serve", description="Serve DeepSeek-V4-class models.")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete a prompt on this machine (no cluster)")
    g.add_argument("--model", default="tiny", help="preset name or checkpoint directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--bos", action="store_true", help="prepend the BOS token")
    g.add_argument("--reference-rounding", action="store_true",
                   help="FP8 window/compressed keys and FP4 indexer, as DeepSeek's reference code")
    g.set_defaults(func=_generate)

    capacity_cmd.add_parser(sub)

    s = sub.add_parser("serve", help="start a local Ray cluster serving the OpenAI-compatible endpoint")
    s.add_argument("--profile", default="chat", help="bundled endpoint profile")
    s.add_argument("--config", help="endpoint profile YAML file (instead of --profile)")
    s.add_argument("--model", default="tiny", help="preset name or checkpoint directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.set_defaults(func=_serve)

    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
