"""The feature dashboard in a real browser: Debian's headless Chromium driven by playwright.

Without Chromium (or playwright) the test skips with the reason; under CI=true it fails instead
(.ci/run installs Chromium). Screenshots of the index and of one latent page are saved under
$TEST_ARTIFACTS_DIR when set, else under the test's tmp_path; their paths are printed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from trainer import artifacts as A
from trainer.checkpoint import atomic_write_text
from trainer.cli import app
from trainer.config import RunConfig, SAEConfig
from trainer.export import folded_weights, saelens_cfg, write_weights
from trainer.saes import build_sae

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
HOOK = "blocks.1.hook_resid_post"
D_SAE = 48


def _browser_or_skip():
    """playwright's sync API, or a skip (a failure under CI=true) naming what is missing."""
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed (pip install -e '.[dev]')"
    if missing is None and not Path(CHROMIUM).exists():
        missing = f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set CHROMIUM)"
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser test under CI=true: {missing}")
        pytest.skip(missing)
    return sync_playwright


def _run(root: Path, store: Path) -> Path:
    """A finished baseline run with random weights on the tiny Gemma-2 store (real tokens)."""
    cfg = RunConfig.from_flat(dict(store=str(store), hook=HOOK, out=str(root), arch="baseline", d_sae=D_SAE))
    root.mkdir(parents=True)
    atomic_write_text(A.run_paths(root).config, json.dumps(cfg.to_flat()))
    sae = build_sae(SAEConfig(arch="baseline", d_in=64, d_sae=D_SAE), seed=3)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # some latents stay silent: dead ones to filter
    meta = {"sae": asdict(sae.cfg), "saelens_cfg": saelens_cfg(sae, final_k=None, metadata={"scaling_factor_folded": 1.0})}
    write_weights(A.run_paths(root).weights, folded_weights(sae, 1.0), meta)
    return root


def _artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("TEST_ARTIFACTS_DIR", tmp_path / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_dashboard_in_headless_chromium(small_store, tmp_path):
    sync_playwright = _browser_or_skip()
    run = _run(tmp_path / "run", small_store)
    res = CliRunner().invoke(app, ["features", str(run), "--split", "all", "--latents", "12", "--examples", "6"])
    assert res.exit_code == 0, res.output
    site = run / "features"
    data = json.loads((site / "features.json").read_text())
    latent = next(lat for lat in data["latents"] if lat["page"] and lat["examples"])
    token = latent["top_tokens"][0]["text"].strip() or latent["top_tokens"][0]["text"]
    n_dead = sum(lat["dead"] for lat in data["latents"])
    shots = _artifacts(tmp_path)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((site / "index.html").as_uri())
        rows = page.locator("#latents-body tr")
        assert rows.count() == D_SAE
        page.screenshot(path=str(shots / "features-index.png"))

        page.fill("#search", str(latent["latent"]))  # by index: exactly that latent
        assert rows.count() == 1 and rows.first.get_attribute("data-latent") == str(latent["latent"])
        page.fill("#search", token)  # by token: every row left lists it among its top tokens
        hits = rows.count()
        assert 1 <= hits
        expect = sum(any(token.lower() in t["text"].lower() for t in lat["top_tokens"]) for lat in data["latents"])
        assert hits == expect
        page.fill("#search", "")
        page.select_option("#dead-filter", "dead")
        assert rows.count() == n_dead and all(rows.nth(i).get_attribute("class") == "dead" for i in range(n_dead))
        page.select_option("#dead-filter", "all")

        page.click('th[data-key="frequency"]')  # sortable: most frequent first
        freqs = [data["latents"][int(rows.nth(i).get_attribute("data-latent"))]["frequency"] for i in range(D_SAE)]
        assert freqs == sorted(freqs, reverse=True)

        page.click(f'a[href="latents/{latent["latent"]}.html"]')
        page.wait_for_load_state()
        assert page.locator("h1").inner_text().startswith(f"latent {latent['latent']}")
        examples = page.locator("#contexts tr.example")
        assert examples.count() == len(latent["examples"])
        assert page.locator("#contexts .tok.max").count() == len(latent["examples"])  # the max token marked
        shaded = page.eval_on_selector_all(
            "#contexts .tok", "els => els.filter(e => getComputedStyle(e).backgroundColor !== 'rgba(0, 0, 0, 0)').length")
        assert shaded >= len(latent["examples"])  # tokens highlighted by activation
        assert page.locator("#histogram rect").count() >= 1
        assert page.locator("table.logits-positive tr").count() == 10
        assert page.locator("table.neighbours-coactivation tr").count() >= 2
        page.screenshot(path=str(shots / "features-latent.png"), full_page=True)
        browser.close()
    assert errors == []
    print(f"screenshots: {shots / 'features-index.png'} {shots / 'features-latent.png'}")
