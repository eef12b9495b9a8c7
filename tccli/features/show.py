"""`tc show`: a features file (from `tc score`) seen by a person.

Two views of the same records (``tccli.features.files.FeaturesFile.feature``):
- the terminal: one feature with rich, its examples' tokens shaded by the feature's activation;
- one static, self-contained HTML page (inline CSS and SVG, no scripts, no network) with a card per
  feature: shaded examples, the layer's log-density histogram with this feature marked, a histogram of
  its sampled activations, and de-embedding, logit and pullback tables (and for a cross-layer transcoder's
  feature, its decoder norm per layer it writes to).
"""

from __future__ import annotations

import html
import math
from typing import Optional

import numpy as np

from tccli.config.features import ShowConfig
from tccli.errors import fail
from tccli.features.files import FeaturesFile
from tccli.nodes import feature_name, parse_feature


def parse_feature_list(text: str) -> list[tuple[int, int]]:
    return [parse_feature(part) for part in text.split(",") if part.strip()]


def default_refs(features: FeaturesFile, limit: int) -> list[tuple[int, int]]:
    """The first ``limit`` features (layer by layer) that fired at least once."""
    refs: list[tuple[int, int]] = []
    for layer in features.layers:
        live = np.nonzero(features.frequencies(layer) > 0)[0]
        refs.extend((layer, int(i)) for i in live[: limit - len(refs)])
        if len(refs) >= limit:
            break
    return refs


def density_text(frequency: float) -> str:
    if frequency <= 0:
        return "dead (never fired)"
    return f"{100 * frequency:.3g}% of tokens (log10 {math.log10(frequency):.2f})"


def visible(token: str) -> str:
    """A token's text with newlines, tabs and other control characters made visible."""
    if not token:
        return "∅"
    token = token.replace("\n", "⏎").replace("\t", "⇥")
    return "".join(chr(0x2400 + ord(c)) if ord(c) < 32 else c for c in token)  # Unicode control pictures


# ============================================================================ terminal


def shade(fraction: float) -> str:
    """A rich background style: white for 0, saturated orange at the feature's max."""
    f = min(max(fraction, 0.0), 1.0)
    green, blue = int(255 - 150 * f), int(255 - 255 * f)
    return f"black on rgb(255,{green},{blue})" if f > 0 else ""


def example_text(features: FeaturesFile, example: dict, max_activation: float):
    from rich.text import Text

    text = Text()
    centre = len(example["tokens"]) // 2
    for j, (token, act) in enumerate(zip(example["tokens"], example["acts"])):
        if token < 0:
            continue
        style = shade(act / max_activation if max_activation > 0 else 0.0)
        if j == centre:
            style = (style + " bold underline").strip()
        text.append(visible(features.token_text(token)), style=style or None)
    return text


def token_table(title: str, features: FeaturesFile, pairs: list) -> Table:  # noqa: F821
    from rich.table import Table

    table = Table(title=title, show_header=False, box=None, padding=(0, 1))
    for token, value in pairs:
        table.add_row(repr(features.token_text(int(token))), f"{value:+.3f}")
    return table


def render_terminal(features: FeaturesFile, record: dict, n_examples: int, console) -> None:
    from rich.columns import Columns
    from rich.panel import Panel
    from rich.table import Table

    name = feature_name(record["layer"], record["feature"])
    cf = record.get("context_free")
    header = (
        f"density {density_text(record['frequency'])}   mean {record['mean_activation']:.3g}   "
        f"max {record['max_activation']:.3g}   context-free {'-' if cf is None else f'{cf:.2f}'}"
    )
    console.print(Panel(header, title=name, expand=False))
    if record.get("decoder_norms"):
        console.print(writes_text(record["decoder_norms"]))
    tables = [
        token_table("de-embedding", features, record["deembedding"]),
        token_table("promotes", features, record["logit_promoted"]),
        token_table("suppresses", features, record["logit_suppressed"]),
    ]
    if record["pullbacks"]:
        pulls = Table(title="pullbacks", show_header=False, box=None, padding=(0, 1))
        for layer, feature, value in record["pullbacks"]:
            pulls.add_row(feature_name(layer, feature), f"{value:+.3f}")
        tables.append(pulls)
    console.print(Columns(tables, padding=(0, 4)))
    peak = record["max_activation"]
    for title, key in (("top examples", "top_examples"), ("quantile examples", "quantile_examples")):
        examples = record[key][:n_examples] if key == "top_examples" else spread(record[key], n_examples)
        if not examples:
            continue
        table = Table(title=title, show_header=True, box=None, padding=(0, 1), title_justify="left")
        table.add_column("act", justify="right")
        table.add_column("band" if key != "top_examples" else "doc", justify="right")
        table.add_column("context")
        for example in examples:
            where = str(example.get("band", example["doc"]))
            table.add_row(f"{example['activation']:.3f}", where, example_text(features, example, peak))
        console.print(table)
    if not record["top_examples"]:
        console.print("(no examples: the feature never fired on the scored text)")


def writes_text(norms: list) -> str:
    """A cross-layer transcoder feature's decoder norm per layer it writes to, on one line."""
    return "writes (decoder norm)  " + "  ".join(f"L{layer} {norm:.3g}" for layer, norm in norms)


def spread(examples: list[dict], n: int) -> list[dict]:
    """Up to n examples spread over the bands (highest band first)."""
    if len(examples) <= n:
        return examples
    picks = np.linspace(0, len(examples) - 1, n).round().astype(int)
    return [examples[i] for i in sorted(set(picks.tolist()))]


# ============================================================================ HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;background:#f6f6f4;color:#222}
h1{font-size:20px;margin:0 0 4px}
.meta{color:#666;font-size:13px;margin-bottom:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px 18px;margin:0 0 18px;
      box-shadow:0 1px 2px rgba(0,0,0,.05)}
.card h2{font-size:17px;margin:0 0 6px;font-family:ui-monospace,Menlo,Consolas,monospace}
.stats{font-size:13px;color:#444;margin-bottom:10px}
.row{display:flex;flex-wrap:wrap;gap:22px;align-items:flex-start}
table.tok{border-collapse:collapse;font-size:12px}
table.tok caption{font-weight:600;text-align:left;font-size:12px;padding-bottom:2px}
table.tok td{padding:1px 6px;border-bottom:1px solid #eee;font-family:ui-monospace,Menlo,Consolas,monospace}
table.tok td.v{text-align:right;color:#555}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;line-height:1.9;margin:1px 0;
    white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.ex .a{display:inline-block;width:64px;color:#555;text-align:right;margin-right:8px}
.t{padding:1px 0;border-radius:2px;white-space:pre}
.c{outline:1.5px solid #333}
h3{font-size:13px;margin:12px 0 4px;color:#333}
svg text{font-family:system-ui,sans-serif;font-size:10px;fill:#555}
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def html_example(features: FeaturesFile, example: dict, peak: float, label: str) -> str:
    centre = len(example["tokens"]) // 2
    spans = []
    for j, (token, act) in enumerate(zip(example["tokens"], example["acts"])):
        if token < 0:
            continue
        alpha = min(max(act / peak, 0.0), 1.0) if peak > 0 else 0.0
        css = f"background:rgba(255,110,0,{alpha:.3f})"
        cls = "t c" if j == centre else "t"
        spans.append(
            f'<span class="{cls}" style="{css}" title="{act:.4f}">{_esc(visible(features.token_text(token)))}</span>'
        )
    return f'<div class="ex"><span class="a">{_esc(label)}</span>{"".join(spans)}</div>'


def html_token_table(title: str, features: FeaturesFile, pairs: list) -> str:
    rows = "".join(
        f"<tr><td>{_esc(repr(features.token_text(int(t))))}</td><td class=v>{v:+.3f}</td></tr>" for t, v in pairs
    )
    return f'<table class="tok"><caption>{_esc(title)}</caption>{rows}</table>'


def svg_histogram(
    counts: list[int], labels: tuple[str, str], highlight: Optional[int], title: str, width: int = 260, height: int = 90
) -> str:
    """A bar chart as inline SVG; bar ``highlight`` is drawn in orange."""
    n = max(len(counts), 1)
    peak = max(max(counts, default=0), 1)
    bar = (width - 10) / n
    plot_h = height - 28
    bars = []
    for i, count in enumerate(counts):
        h = plot_h * count / peak
        colour = "#ff6e00" if i == highlight else "#7a8ca5"
        bars.append(
            f'<rect x="{5 + i * bar:.1f}" y="{14 + plot_h - h:.1f}" width="{max(bar - 1, 0.5):.1f}" '
            f'height="{h:.1f}" fill="{colour}"><title>{count}</title></rect>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
        f'<text x="5" y="10" style="font-weight:600;fill:#333">{_esc(title)}</text>{"".join(bars)}'
        f'<line x1="5" x2="{width - 5}" y1="{14 + plot_h}" y2="{14 + plot_h}" stroke="#999"/>'
        f'<text x="5" y="{height - 2}">{_esc(labels[0])}</text>'
        f'<text x="{width - 5}" y="{height - 2}" text-anchor="end">{_esc(labels[1])}</text></svg>'
    )


DENSITY_BINS = np.arange(-7.0, 0.25, 0.25)  # log10 firing frequency, quarter-decade bins


def density_histogram(frequencies: np.ndarray, frequency: float) -> str:
    """The layer's log10-density histogram with this feature's bin marked; dead features are left out."""
    live = frequencies[frequencies > 0]
    counts, _ = np.histogram(np.clip(np.log10(live), DENSITY_BINS[0], DENSITY_BINS[-1] - 1e-9), bins=DENSITY_BINS)
    mark = None
    if frequency > 0:
        mark = int(np.clip(np.searchsorted(DENSITY_BINS, math.log10(frequency), side="right") - 1, 0, len(counts) - 1))
    dead = int((frequencies <= 0).sum())
    return svg_histogram(counts.tolist(), ("1e-7", "1"), mark, f"layer density (log10), {dead} dead")


def activation_histogram(record: dict, bins: int = 16) -> str:
    values = [e["activation"] for e in record["quantile_examples"]] or [e["activation"] for e in record["top_examples"]]
    peak = record["max_activation"]
    if not values or peak <= 0:
        return ""
    counts, _ = np.histogram(values, bins=bins, range=(0.0, peak))
    return svg_histogram(counts.tolist(), ("0", f"{peak:.3g}"), None, f"sampled activations (n={len(values)})")


def html_card(features: FeaturesFile, record: dict, n_examples: int, frequencies: np.ndarray) -> str:
    name = feature_name(record["layer"], record["feature"])
    cf = record.get("context_free")
    peak = record["max_activation"]
    stats = (
        f"density {density_text(record['frequency'])} · mean {record['mean_activation']:.3g} · "
        f"max {peak:.3g} · context-free {'–' if cf is None else f'{cf:.2f}'}"
    )
    tables = [
        html_token_table("de-embedding", features, record["deembedding"]),
        html_token_table("promotes", features, record["logit_promoted"]),
        html_token_table("suppresses", features, record["logit_suppressed"]),
    ]
    if record["pullbacks"]:
        rows = "".join(f"<tr><td>L{la}.F{f}</td><td class=v>{v:+.3f}</td></tr>" for la, f, v in record["pullbacks"])
        tables.append(f'<table class="tok"><caption>pullbacks</caption>{rows}</table>')
    if record.get("decoder_norms"):  # a cross-layer transcoder's feature: where it writes, and how strongly
        rows = "".join(f"<tr><td>L{la}</td><td class=v>{v:.3f}</td></tr>" for la, v in record["decoder_norms"])
        tables.append(f'<table class="tok writes"><caption>writes (decoder norm)</caption>{rows}</table>')
    top = "".join(
        html_example(features, e, peak, f"{e['activation']:.3f}") for e in record["top_examples"][:n_examples]
    )
    quant = "".join(
        html_example(features, e, peak, f"q{e['band']} {e['activation']:.2f}")
        for e in spread(record["quantile_examples"], n_examples)
    )
    return (
        f'<section class="card" id="{name}"><h2>{name}</h2><div class="stats">{_esc(stats)}</div>'
        f'<div class="row">{density_histogram(frequencies, record["frequency"])}'
        f"{activation_histogram(record)}{''.join(tables)}</div>"
        f"<h3>top activations</h3>{top or '<p>never fired on the scored text</p>'}"
        + (f"<h3>sampled examples by activation band (q1 lowest)</h3>{quant}" if quant else "")
        + "</section>"
    )


def render_html(features: FeaturesFile, refs: list[tuple[int, int]], n_examples: int) -> str:
    meta = features.meta
    model = meta.get("model_info", {})
    data = meta.get("data", {})
    frequencies = {layer: features.frequencies(layer) for layer in {layer for layer, _ in refs}}
    cards = "".join(
        html_card(features, features.feature(layer, i), n_examples, frequencies[layer]) for layer, i in refs
    )
    subtitle = (
        f"model {model.get('name', '?')} ({model.get('architecture', '?')}) · "
        f"{data.get('tokens', '?')} tokens from {', '.join(map(str, data.get('sources', [])))} · "
        f"tc {meta.get('tc_version', '?')} · {len(refs)} features"
    )
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>tc features: {_esc(str(features.path.name))}</title><style>{CSS}</style></head><body>"
        f"<h1>Transcoder features</h1><div class=meta>{_esc(subtitle)}</div>{cards}</body></html>"
    )


def resolve_refs(features: FeaturesFile, config: ShowConfig) -> list[tuple[int, int]]:
    refs = parse_feature_list(config.features) if config.features else default_refs(features, config.limit)
    for layer, index in refs:
        features.check_feature(layer, index)
    if not refs:
        raise fail(f"{features.path}: no feature fired on the scored text; name some with --features")
    return refs
