"""`cltrace intervene "PROMPT" --transcoders T --set L:F[@P]=V`: change features, see what the model does."""

from __future__ import annotations

import json

from cltrace.errors import CltraceError


def add_parser(sub, name: str) -> None:
    from cltrace.models.registry import DEFAULT_MODEL

    p = sub.add_parser(
        name, help="set, scale or zero transcoder features and show how the prediction changes",
        description="Set, scale or zero transcoder features on a prompt and show the next-token and feature "
                    "changes. LAYER:FEATURE[@POS]: POS is a prompt position (negative counts from the end); "
                    "without it the change applies at every position, generated tokens included.")
    p.add_argument("prompt", nargs="?", help="the prompt (default: the --graph's prompt)")
    p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    p.add_argument("--transcoders", "-t", required=True, help="transcoder folder (from `cltrace train`)")
    p.add_argument("--set", action="append", default=[], metavar="L:F[@P]=V", help="set an activation to V")
    p.add_argument("--scale", action="append", default=[], metavar="L:F[@P]=X", help="multiply an activation by X")
    p.add_argument("--zero", action="append", default=[], metavar="L:F[@P]", help="turn a feature off")
    p.add_argument("--graph", "-g", metavar="FILE",
                   help="attribution graph of the same prompt (`cltrace trace`): its nodes are watched by default "
                        "and its direct prediction is shown next to the measured change")
    p.add_argument("--node", action="append", default=[], metavar="ID[=V]",
                   help="a graph feature node id LAYER_FEATURE_POS, or 'top' for the graph's most influential "
                        "feature: set it to V, or turn it off without =V")
    p.add_argument("--mode", choices=["constrained", "free"], default="constrained",
                   help="constrained: inside the prompt's local replacement model (errors, attention and norms "
                        "frozen); free: in the real model, everything downstream recomputing (default constrained)")
    p.add_argument("--constrained-layers", metavar="A:B",
                   help="layers whose features keep their clean activations (A:B is A..B-1, or 'all'); "
                        "'all' leaves only direct effects, as in the graph's edges")
    p.add_argument("--watch", action="append", default=[], metavar="L:F[@P]",
                   help="features whose activation change to report (default: the most active reachable ones)")
    p.add_argument("--n-watch", type=int, default=10, help="how many features to report by default (10)")
    p.add_argument("--top", "-k", type=int, default=5, help="how many next tokens to show (default 5)")
    p.add_argument("--generate", type=int, metavar="N", help="also continue the prompt N tokens, with and without")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both continuations")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def interventions_from_args(args) -> list:
    from cltrace.interventions.spec import Intervention, parse_feature, parse_intervention

    ivs = [parse_intervention(s, "set") for s in args.set] + [parse_intervention(s, "scale") for s in args.scale]
    for s in args.zero:
        layer, pos, feature, value = parse_feature(s, what="--zero")
        if value is not None:
            raise CltraceError(f"--zero {s!r} takes no value: write LAYER:FEATURE[@POS]")
        ivs.append(Intervention(layer=layer, pos=pos, feature=feature, value=0.0, op="set"))
    for s in args.node:
        node, _, value = s.partition("=")
        if node == "top":
            node = top_node(args.graph)
        ivs.append(parse_intervention(f"{node}={value or 0}", "set"))
    return ivs


def top_node(graph_path: str | None) -> str:
    """The id LAYER_FEATURE_POS of the graph's most influential feature node (after pruning)."""
    from cltrace.attribution import Graph
    from cltrace.interventions.graph import graph_watch

    if graph_path is None:
        raise CltraceError("--node top needs --graph FILE")
    top = graph_watch(Graph.load(graph_path), set(), 1)
    if not top:
        raise CltraceError(f"the graph {graph_path} has no feature node left after pruning")
    return f"{top[0].layer}_{top[0].feature}_{top[0].pos}"


def run(args, ctx) -> int:
    from cltrace.interventions.api import intervene, intervene_generate
    from cltrace.models.registry import load_model
    from cltrace.transcoders.io import load_transcoder

    ivs = interventions_from_args(args)
    if args.prompt is None and args.graph is None:
        raise CltraceError("give a prompt, or --graph FILE to use the graph's prompt")
    if args.node and args.graph is None:
        raise CltraceError("--node names a node of a graph: give --graph FILE too (or use --set L:F@P=V)")
    model = load_model(args.model, device=ctx.device, dtype=ctx.dtype)
    tc = load_transcoder(args.transcoders, device=ctx.device, dtype=ctx.dtype)
    out = intervene(model, tc, args.prompt, ivs, mode=args.mode, constrained_layers=args.constrained_layers,
                    watch=args.watch or None, n_watch=args.n_watch, top=args.top, graph=args.graph).to_dict()
    if args.generate:
        out["generation"] = intervene_generate(
            model, tc, out["prompt"], ivs, n_tokens=args.generate, mode=args.mode,
            constrained_layers=args.constrained_layers, temperature=args.temperature, seed=args.seed).to_dict()
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
        return 0
    print(format_report(out))
    return 0


def format_report(out: dict) -> str:
    """The human-readable report: interventions, next tokens before/after, watched features, generations."""
    held = out["constrained_layers"]
    lines = [f"prompt: {out['prompt']!r}   mode: {out['mode']}"
             + (f" (layers {held[0]}..{held[-1]} held)" if held else "")]
    for iv in out["interventions"]:
        where = "all positions" if iv["pos"] is None else f"@{iv['pos']}"
        was = ", ".join(f"{r['act_before']:.3g}" for r in iv["positions"][:8])
        lines.append(f"  {iv['op']} {iv['layer']}:{iv['feature']} {where} {'=' if iv['op'] == 'set' else '×'} "
                     f"{iv['value']:g}   (was {was}{' …' if len(iv['positions']) > 8 else ''})")
    lines.append(f"\n  {'before':<34}{'after'}")
    for b, a in zip(out["logits_before"], out["logits_after"]):
        lines.append(f"  {b['prob']:7.4f} {b['token']!r:<25}{a['prob']:7.4f} {a['token']!r}")
    t = out["top_token"]
    lines.append(f"\n  top token {t['token']!r}: logit {t['logit_before']:.3f} -> {t['logit_after']:.3f}, "
                 f"prob {t['prob_before']:.4f} -> {t['prob_after']:.4f}")
    if out["features"]:
        graph = out.get("graph") is not None
        lines.append("\n  feature            token          act before -> after   (pre-activation)"
                     + ("   Δpre graph-predicted (direct)" if graph else ""))
        for f in out["features"]:
            pred = f.get("pre_change_predicted_direct")
            lines.append(f"  {f['layer']:>3}:{f['feature']:<7}@{f['pos']:<4} {f['token']!r:<14} "
                         f"{f['act_before']:9.4f} -> {f['act_after']:<9.4f} ({f['pre_before']:.4f} -> "
                         f"{f['pre_after']:.4f})" + (f"   {pred:+.4f}" if pred is not None else ""))
    if out.get("graph") is not None:
        lines.append("\n  logit − mean logit   measured Δ   graph-predicted Δ (direct effects only)")
        for r in out["graph"]["logit_changes"]:
            m = "n/a" if r["measured"] is None else f"{r['measured']:+.4f}"
            lines.append(f"  {r['token']!r:<20} {m:>10}   {r['predicted_direct']:+.4f}")
        if out["graph"]["changes_outside_graph"]:
            lines.append(f"  (not graph nodes, so not in the prediction: "
                         f"{', '.join(out['graph']['changes_outside_graph'][:8])})")
    g = out.get("generation")
    if g:
        lines.append(f"\n  original: {g['prompt']}{g['original']}")
        lines.append(f"  steered:  {g['prompt']}{g['steered']}")
    return "\n".join(lines)
