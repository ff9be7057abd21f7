"""The static site of ``sae features``: ``index.html`` (+ ``index-data.js``), one page per shown
latent under ``latents/``, ``features.json`` (the contract) and the CSS/JS, written into a temporary
directory and swapped in, so a failure never leaves half a site."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

from actcache.errors import ActcacheError
from trainer.checkpoint import new_temp_dir, swap_dir
from trainer.features.assets import INDEX_JS, STYLE_CSS

FEATURES_JSON = "features.json"
INDEX_KEYS = ("latent", "frequency", "max_activation", "mean_activation", "dead", "top_tokens", "histogram", "page")


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _tok(s: str) -> str:
    return _esc(s.replace("\n", "\u21b5"))


def _page(title: str, body: str, css: str, scripts: tuple[str, ...] = ()) -> str:
    tags = "".join(f'<script src="{s}"></script>' for s in scripts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f'<link rel="stylesheet" href="{css}"></head><body>\n{body}\n{tags}</body></html>\n')


def index_html(data: dict[str, Any]) -> str:
    head = (f"<h1>sae features: {_esc(data['arch'])} ({data['d_sae']} latents)</h1>"
            f'<p class="meta">run <code>{_esc(data["run_dir"])}</code> &middot; hook <code>{_esc(data["hook"])}</code>'
            f' &middot; {data["n_rows"]:,} rows of the {_esc(data["split"])} split of <code>{_esc(data["store"])}</code>'
            f' &middot; data: <a href="{FEATURES_JSON}">{FEATURES_JSON}</a></p>')
    notes = "".join(f'<p class="note">{_esc(n)}</p>' for n in data["notes"])
    controls = ('<div class="controls"><input id="search" type="search" placeholder="search: latent index or token">'
                ' <select id="dead-filter"><option value="all">all latents</option><option value="alive">alive only'
                '</option><option value="dead">dead only</option></select> <span id="count"></span></div>')
    cols = [("latent", "latent"), ("frequency", "frequency"), ("max_activation", "max act"),
            ("mean_activation", "mean act (firing)"), (None, "top tokens"), (None, "density (log act)")]
    ths = "".join(f'<th data-key="{k}">{t}</th>' if k else f"<th>{t}</th>" for k, t in cols)
    table = f'<table id="latents"><thead><tr>{ths}</tr></thead><tbody id="latents-body"></tbody></table>'
    return _page("sae features", head + notes + controls + table, "style.css", ("index-data.js", "index.js"))


def index_data_js(data: dict[str, Any]) -> str:
    rows = [{k: lat[k] for k in INDEX_KEYS} for lat in data["latents"]]
    return "window.FEATURES = " + json.dumps({"latents": rows}, separators=(",", ":")) + ";\n"


def _shade(act: float, top: float) -> str:
    alpha = max(0.0, min(1.0, act / top)) if top > 0 else 0.0
    return f"background: rgba(255, 110, 0, {alpha:.3f})"


def _contexts_html(lat: dict[str, Any]) -> str:
    top = lat["max_activation"]
    rows = []
    for ex, ctx in zip(lat["examples"], lat.get("contexts", [])):
        spans = []
        for n, (text, act) in enumerate(zip(ctx["text"], ctx["acts"])):
            pos = ctx["start"] + n
            cls = "tok max" if pos == ex["position"] else "tok"
            spans.append(f'<span class="{cls}" style="{_shade(act, top)}" title="position {pos}: {act:.4g}">'
                         f"{_tok(text)}</span>")
        rows.append(f'<tr class="example"><td>{ex["activation"]:.4g}</td><td>{ex["window"]}:{ex["position"]}</td>'
                    f'<td class="ctx">{"".join(spans)}</td></tr>')
    if not rows:
        return "<p>This latent never fired on the split.</p>"
    return ('<table id="contexts"><thead><tr><th>activation</th><th>window:pos</th><th>context (max token outlined)'
            f'</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _histogram_svg(hist: dict[str, Any], edges: list[float]) -> str:
    counts = hist["counts"]
    if not counts:
        return "<p>No non-zero activations.</p>"
    w, h, n, top = 480, 120, len(counts), max(counts)
    bw = w / n
    bars = "".join(f'<rect x="{i * bw:.1f}" y="{h - c / top * h:.1f}" width="{max(bw - 1, 1):.1f}" '
                   f'height="{c / top * h:.1f}" fill="#d60"><title>{edges[hist["first"] + i]:.3g}'
                   f'&ndash;{edges[hist["first"] + i + 1]:.3g}: {c}</title></rect>' for i, c in enumerate(counts))
    lo, hi = edges[hist["first"]], edges[hist["first"] + n]
    return (f'<svg id="histogram" width="{w}" height="{h + 16}">{bars}<text x="0" y="{h + 14}" font-size="11">'
            f'{lo:.3g}</text><text x="{w}" y="{h + 14}" font-size="11" text-anchor="end">{hi:.3g}</text></svg>'
            '<p class="note">Non-zero activations, log-spaced bins (20 per decade).</p>')


def _logits_html(lat: dict[str, Any], note: str | None) -> str:
    if "logits" not in lat:
        return "<p class=\"note\">Not computed (the store's model did not load, or --no-logits).</p>"
    tables = []
    for side in ("positive", "negative"):
        rows = "".join(f"<tr><td class=\"tokens\"><code>{_tok(e['text'])}</code></td><td>{e['value']:+.4g}</td></tr>"
                       for e in lat["logits"][side])
        tables.append(f'<div><h3>{side}</h3><table class="logits-{side}">{rows}</table></div>')
    return f'<div class="cols">{"".join(tables)}</div><p class="note">W_dec[i] through W_U: {_esc(note)}.</p>'


def _neighbours_html(lat: dict[str, Any], pages: set[int]) -> str:
    titles = {"sigma": "from the run's own &Sigma; (EMA latent statistics of training)",
              "coactivation": "from co-activation on the evaluated split (Pearson)"}
    parts = []
    for source, items in lat.get("neighbours", {}).items():
        rows = "".join(f"<tr><td>{_latent_link(e['latent'], pages)}</td><td>{e['corr']:+.3f}</td></tr>" for e in items)
        parts.append(f'<div><h3>{titles[source]}</h3><table class="neighbours-{source}"><tr><th>latent</th>'
                     f'<th>R</th></tr>{rows}</table></div>')
    return f'<div class="cols">{"".join(parts)}</div>'


def _latent_link(j: int, pages: set[int]) -> str:
    return f'<a href="{j}.html">{j}</a>' if j in pages else str(j)


def latent_html(lat: dict[str, Any], data: dict[str, Any], pages: set[int]) -> str:
    i = lat["latent"]
    prev = f'<a href="{i - 1}.html">&larr; {i - 1}</a>' if i - 1 in pages else ""
    nxt = f'<a href="{i + 1}.html">{i + 1} &rarr;</a>' if i + 1 in pages else ""
    nav = f'<nav><a href="../index.html">index</a>{prev}{nxt}</nav>'
    dead = ' <span class="badge">dead</span>' if lat["dead"] else ""
    head = (f"<h1>latent {i}{dead}</h1><p class=\"meta\">{_esc(data['arch'])}, hook <code>{_esc(data['hook'])}"
            f"</code> &middot; frequency {lat['frequency']:.4g} ({lat['n_fired']:,} of {data['n_rows']:,} rows) "
            f"&middot; max {lat['max_activation']:.4g} &middot; mean when firing {lat['mean_activation']:.4g}</p>")
    body = (nav + head + "<h2>Top activating contexts</h2>" + _contexts_html(lat)
            + "<h2>Activation histogram</h2>" + _histogram_svg(lat["histogram"], data["histogram_edges"])
            + "<h2>Logit effects</h2>" + _logits_html(lat, data["logit_effects_note"])
            + "<h2>Correlation neighbours</h2>" + _neighbours_html(lat, pages))
    return _page(f"latent {i}", body, "../style.css")


def check_out_dir(out: Path) -> None:
    """A previous site is replaced; anything else that is not empty is refused."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / FEATURES_JSON).exists())):
        raise ActcacheError(f"--out {out} exists and is not a sae features site: choose a new path")


def write_site(data: dict[str, Any], out: str | Path) -> Path:
    """Write the whole site to ``out`` (replacing a previous one); returns the path of index.html."""
    out = Path(out)
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_dir(out.parent, f".{out.name}.tmp-")  # umask permissions, unlike mkdtemp's 0700
    try:
        (tmp / "latents").mkdir()
        (tmp / FEATURES_JSON).write_text(json.dumps(data, allow_nan=False))
        (tmp / "style.css").write_text(STYLE_CSS)
        (tmp / "index.js").write_text(INDEX_JS)
        (tmp / "index-data.js").write_text(index_data_js(data))
        (tmp / "index.html").write_text(index_html(data))
        pages = {lat["latent"] for lat in data["latents"] if lat["page"]}
        for lat in data["latents"]:
            if lat["page"]:
                (tmp / lat["page"]).write_text(latent_html(lat, data, pages))
        swap_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"
