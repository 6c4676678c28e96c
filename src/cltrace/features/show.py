"""A feature card as text (a terminal) or as a PNG: label, frequency, histogram, examples, effects.

In text, active tokens are marked `[[token]]` (plain output) or in bold on a background whose strength follows
the activation (a terminal; ANSI colours), the example's own token underlined as well. Newlines and tabs in
tokens show as ⏎ and ⇥.
"""

from __future__ import annotations

from pathlib import Path

from cltrace.features.db import Example, FeatureCard, TokenValue

SPARK = "▁▂▃▄▅▆▇█"
BACKGROUNDS = (230, 229, 228, 221, 214, 208)  # ANSI 256-colour backgrounds, weak to strong activation


def token_text(token: str) -> str:
    """A token for one line of output: newlines, tabs and other control characters made visible."""
    token = token.replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")
    return "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in token)


def sparkline(counts: list[int]) -> tuple[str, int, int]:
    """(bars, first bin, last bin) over the span of nonzero bins; a space marks an empty bin inside it."""
    nz = [i for i, c in enumerate(counts) if c]
    if not nz:
        return "", 0, 0
    lo, hi = nz[0], nz[-1]
    top = max(counts)
    bars = "".join(" " if c == 0 else SPARK[min(len(SPARK) - 1, (c * len(SPARK) - 1) // top)]
                   for c in counts[lo:hi + 1])
    return bars, lo, hi


def example_text(ex: Example, *, color: bool) -> str:
    peak = max(ex.value, max((a for a in ex.acts if a == a), default=0.0), 1e-30)
    out = []
    for i, (tok, a) in enumerate(zip(ex.tokens, ex.acts)):
        t = token_text(tok)
        if not a > 0:
            out.append(t)
        elif color:
            bg = BACKGROUNDS[min(len(BACKGROUNDS) - 1, int(a / peak * len(BACKGROUNDS)))]
            under = ";4" if i == ex.center else ""
            out.append(f"\x1b[1{under};30;48;5;{bg}m{t}\x1b[0m")
        else:
            out.append(f"[[{t}]]")
    return "".join(out)


def _bin_range(card: FeatureCard, i: int) -> tuple[float, float]:
    e = card.bin_edges
    return (0.0 if i == 0 else e[i - 1]), (float("inf") if i >= len(e) else e[i])


def _tokens(tvs: list[TokenValue]) -> str:
    return "  ".join(f"'{token_text(t.token)}' {t.value:+.3g}" for t in tvs) or "-"


def card_text(card: FeatureCard, *, color: bool = False) -> str:
    """The card as lines of text (`cltrace features show`)."""
    lines = [f"feature {card.id}  {card.label or '(no label)'}  [{card.label_source}]"]
    if card.note:
        lines.append(f"  note: {card.note}")
    if card.label_source != "auto" and card.auto_label:
        lines.append(f"  automatic label: {card.auto_label}")
    seen = f" of {card.tokens_seen} tokens" if card.tokens_seen else ""
    lines.append(f"frequency {card.frequency:.4%} ({card.count}{seen})   max {card.max_act:.4g}   "
                 f"mean when active {card.mean_act:.4g}")
    bars, lo, hi = sparkline(card.histogram)
    if bars:
        lines.append(f"histogram  {_bin_range(card, lo)[0]:.3g} {bars} {_bin_range(card, hi)[1]:.3g}  (log bins)")
    lines.append("top activations:" if card.top else "top activations: none (never active on the corpus)")
    lines += [f"  {ex.value:8.3f}  {example_text(ex, color=color)}" for ex in card.top]
    if any(q.examples for q in card.quantiles):
        lines.append("quantile examples:")
        for q in card.quantiles:
            if q.examples:
                lines.append(f"  [{q.lo:.3g}, {q.hi:.3g}]")
                lines += [f"  {ex.value:8.3f}  {example_text(ex, color=color)}" for ex in q.examples]
    lines.append(f"promoted:   {_tokens(card.output_top)}")
    lines.append(f"suppressed: {_tokens(card.output_bottom)}")
    lines.append(f"input:      {_tokens(card.input_top)}")
    return "\n".join(lines)


def save_card_png(card: FeatureCard, path: str | Path, *, max_examples: int = 12) -> Path:
    """The card drawn with matplotlib: histogram, promoted / suppressed tokens, and examples with each token's
    background following its activation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    rows = [("top", ex) for ex in card.top[:max_examples]]
    for q in card.quantiles[::-1]:
        rows += [(f"[{q.lo:.3g}, {q.hi:.3g}]", ex) for ex in q.examples[:2]]
    fig = plt.figure(figsize=(13, 3.2 + 0.28 * len(rows)))
    grid = fig.add_gridspec(2, 2, height_ratios=[2.6, 0.28 * max(len(rows), 1)], hspace=0.35, wspace=0.3)
    fig.suptitle(f"{card.id}  {card.label}  [{card.label_source}]\nfrequency {card.frequency:.4%}, max "
                 f"{card.max_act:.4g}, mean when active {card.mean_act:.4g}", fontsize=11)
    ax = fig.add_subplot(grid[0, 0])
    bars, lo, hi = sparkline(card.histogram)
    if bars:
        xs = [f"{_bin_range(card, i)[0]:.2g}" for i in range(lo, hi + 1)]
        ax.bar(range(len(xs)), card.histogram[lo:hi + 1], color="#f2a93b")
        ax.set_xticks(range(len(xs))[:: max(1, len(xs) // 8)], xs[:: max(1, len(xs) // 8)], fontsize=7)
    ax.set_title("activations (log bins, nonzero only)", fontsize=9)
    ax = fig.add_subplot(grid[0, 1])
    effects = card.output_top[:8][::-1] + card.output_bottom[:8]
    ax.barh(range(len(effects)), [t.value for t in effects],
            color=["#3b7dd8" if t.value > 0 else "#d84b3b" for t in effects])
    ax.set_yticks(range(len(effects)), [f"'{token_text(t.token)}'" for t in effects], fontsize=7)
    ax.set_title("promoted (blue) and suppressed (red) tokens", fontsize=9)
    ax = fig.add_subplot(grid[1, :])
    ax.axis("off")
    char = 0.6 * 7 / (ax.get_position().width * fig.get_figwidth() * 72)  # a 7-pt monospace character, in axes
    cmap = plt.get_cmap("Oranges")
    for y, (name, ex) in enumerate(rows):
        yy = 1 - (y + 0.5) / max(len(rows), 1)
        ax.text(0, yy, f"{name:>14} {ex.value:7.3f}", family="monospace", fontsize=7, va="center",
                transform=ax.transAxes)
        x = 25
        peak = max(ex.value, 1e-30)
        for i, (tok, a) in enumerate(zip(ex.tokens, ex.acts)):
            t = token_text(tok)
            face = cmap(min(0.7, 0.1 + 0.6 * a / peak)) if a > 0 else "none"
            ax.text(x * char, yy, t, family="monospace", fontsize=7, va="center", transform=ax.transAxes,
                    fontweight="bold" if i == ex.center else "normal",
                    bbox=dict(facecolor=face, edgecolor="none", pad=0.6) if a > 0 else None)
            x += len(t)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
