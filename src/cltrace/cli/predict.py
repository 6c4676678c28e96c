"""`cltrace predict "PROMPT"`: the model's most likely next tokens."""

from __future__ import annotations

import json


def add_parser(sub, name: str) -> None:
    from cltrace.models.registry import DEFAULT_MODEL

    p = sub.add_parser(name, help="print the model's top next tokens for a prompt",
                       description="Print the model's most likely next tokens with their probabilities.")
    p.add_argument("prompt")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"built-in name, model folder, .gguf file or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--top", "-k", type=int, default=10, help="how many tokens (default 10)")
    p.add_argument("--json", action="store_true", help='print a JSON list of {"token", "id", "prob"}')
    p.set_defaults(run=run)


def run(args, ctx) -> int:
    from cltrace.models.predict import predict
    from cltrace.models.registry import load_model

    model = load_model(args.model, device=ctx.device, dtype=ctx.dtype)
    top = predict(model, args.prompt, top=args.top)
    if args.json:
        print(json.dumps(top, ensure_ascii=False))
        return 0
    for row in top:
        print(f"{row['prob']:8.4f}  {row['token']!r:<24} id {row['id']}")
    return 0
