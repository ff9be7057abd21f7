"""The site's static files, as strings: they ship inside the Python package with no
package-data configuration, and the site needs no network (no CDN, no library)."""

STYLE_CSS = r"""/* sae features: plain CSS, no external fonts or network. */
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
.meta { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: right; }
th { cursor: pointer; background: #f3f3f3; position: sticky; top: 0; user-select: none; }
th.sorted-asc::after { content: " \25B2"; } th.sorted-desc::after { content: " \25BC"; }
td.tokens, td.ctx { text-align: left; }
tr.dead td { color: #aaa; }
.badge { font-size: 0.75em; background: #c33; color: #fff; border-radius: 3px; padding: 0 4px; }
.controls { margin: 0.8em 0; } .controls input { width: 22em; }
.ctx { font-family: ui-monospace, monospace; white-space: pre; }
.tok { border-radius: 2px; }
.tok.max { outline: 2px solid #a00; }
.act { display: inline-block; min-width: 5em; color: #555; }
.note { color: #666; font-size: 0.85em; }
.cols { display: flex; gap: 3em; flex-wrap: wrap; }
nav a { margin-right: 1em; }
"""

INDEX_JS = r"""// sae features index: sortable columns, search by latent index or token, dead filter.
// Data: window.FEATURES (index-data.js). No libraries, no network.
(function () {
  "use strict";
  const D = window.FEATURES;
  const rows = D.latents;
  const tbody = document.getElementById("latents-body");
  const search = document.getElementById("search");
  const deadSel = document.getElementById("dead-filter");
  const count = document.getElementById("count");
  let sortKey = "latent", sortDir = 1;

  function fmt(v, d) { return v === null ? "" : Number(v).toPrecision(d); }

  function sparkline(h) {
    if (!h.counts.length) return "";
    const w = 80, ht = 16, n = h.counts.length, mx = Math.max.apply(null, h.counts);
    let path = "";
    h.counts.forEach(function (c, i) {
      const x = (n === 1 ? w / 2 : (i * w) / (n - 1)).toFixed(1);
      const y = (ht - (c / mx) * ht).toFixed(1);
      path += (i ? "L" : "M") + x + " " + y;
    });
    return '<svg class="spark" width="' + w + '" height="' + ht + '"><path d="' + path +
      '" fill="none" stroke="#d60" stroke-width="1"/></svg>';
  }

  function esc(s) {
    return String(s).replace(/[&<>"]/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c];
    });
  }

  function showTok(s) { return esc(s.replace(/\n/g, "\u21B5")); }

  function matches(r, q) {
    if (!q) return true;
    if (/^\d+$/.test(q)) return String(r.latent) === q;
    const ql = q.toLowerCase();
    return r.top_tokens.some(function (t) { return t.text.toLowerCase().indexOf(ql) >= 0; });
  }

  function render() {
    const q = search.value.trim(), dead = deadSel.value;
    const shown = rows.filter(function (r) {
      return matches(r, q) && (dead === "all" || (dead === "dead") === r.dead);
    });
    shown.sort(function (a, b) {
      const x = a[sortKey], y = b[sortKey];
      return (x < y ? -1 : x > y ? 1 : a.latent - b.latent) * sortDir;
    });
    const html = shown.map(function (r) {
      const name = r.page ? '<a href="' + r.page + '">' + r.latent + "</a>" : String(r.latent);
      const toks = r.top_tokens.map(function (t) { return "<code>" + showTok(t.text) + "</code>"; }).join(" ");
      return '<tr class="' + (r.dead ? "dead" : "") + '" data-latent="' + r.latent + '"><td>' + name +
        (r.dead ? ' <span class="badge">dead</span>' : "") + "</td><td>" + fmt(r.frequency, 3) + "</td><td>" +
        fmt(r.max_activation, 4) + "</td><td>" + fmt(r.mean_activation, 4) + '</td><td class="tokens">' + toks +
        "</td><td>" + sparkline(r.histogram) + "</td></tr>";
    });
    tbody.innerHTML = html.join("");
    count.textContent = shown.length + " of " + rows.length + " latents";
  }

  document.querySelectorAll("th[data-key]").forEach(function (th) {
    th.addEventListener("click", function () {
      const key = th.getAttribute("data-key");
      sortDir = key === sortKey ? -sortDir : (key === "latent" ? 1 : -1);
      sortKey = key;
      document.querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(sortDir > 0 ? "sorted-asc" : "sorted-desc");
      render();
    });
  });
  search.addEventListener("input", render);
  deadSel.addEventListener("change", render);
  render();
})();
"""
