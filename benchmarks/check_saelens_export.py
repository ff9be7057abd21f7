"""Check that SAELens loads our export and computes the same latents and reconstructions.

Run: ``python benchmarks/check_saelens_export.py [--saelens-python /tmp/saelens-venv/bin/python]``.

For each arch (baseline -> SAELens "standard", topk and dyncorr -> "topk") a short training run
on a synthetic store (``tests/synthetic.py``; half of them with ``normalize =
expected_average_only_in``, so the scaling factor is folded into the export) writes its
``saelens/`` directory. Our trained SAE (still in memory) encodes and decodes some raw rows
(``z = encode(s x)``, ``x_hat = decode(z) / s``). A second process, in the SAELens side venv (SAELens
is never installed in the project's environment), runs ``sae_lens.SAE.load_from_disk`` on the
export and its ``encode`` / ``decode`` on the same rows; the script prints the largest
differences and exits 1 if any exceeds the tolerance, or if the loaded ``cfg.metadata`` lost
hook_name, model_name, context_size or dataset_path (what SAELens 6.x drops from a cfg.json it
takes for a pre-6.0 one). Without that interpreter it says why and
exits 0 (like ``bench_vs_saelens.py``). Not a unit test: it depends on the side venv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from synthetic import sparse_data, write_store  # noqa: E402

from trainer.config import RunConfig  # noqa: E402
from trainer.train import Trainer  # noqa: E402

DEFAULT_PY = "/tmp/saelens-venv/bin/python"
TOL = 1e-4  # float32 both sides; relative to the largest |value|
# Metadata SAELens drops when it reads a cfg.json as pre-6.0 (issue 12): must survive the load.
KEPT = ("hook_name", "model_name", "context_size", "dataset_path", "prepend_bos", "sae_lens_version")

SAELENS_SIDE = r'''
import json, sys
import numpy as np, torch, sae_lens
from sae_lens import SAE
cases, KEPT = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {"sae_lens": sae_lens.__version__}
for c in cases:
    sae = SAE.load_from_disk(c["export"], device="cpu")
    d = np.load(c["rows"])
    with torch.no_grad():
        x = torch.from_numpy(d["x"])
        z = sae.encode(x)
        x_hat = sae.decode(z)
    out[c["name"]] = {"class": type(sae).__name__, "architecture": sae.cfg.architecture(),
                      "z_err": float((z - torch.from_numpy(d["z"])).abs().max()),
                      "x_hat_err": float((x_hat - torch.from_numpy(d["x_hat"])).abs().max()),
                      "z_scale": float(np.abs(d["z"]).max()), "x_hat_scale": float(np.abs(d["x_hat"]).max()),
                      "l0": float((z > 0).sum(-1).float().mean()),
                      "metadata": {k: sae.cfg.metadata.get(k) for k in KEPT}}
print("RESULT " + json.dumps(out))
'''


def train_case(work: Path, store: Path, arch: str, normalize: str) -> dict:
    name = f"{arch}-{normalize}"
    cfg = RunConfig.from_flat(dict(store=str(store), out=str(work / name), arch=arch, d_sae=48, k=3, k_start=6,
                                   k_end=3, lambda_max=0.05, batch_size=256, n_tokens=256 * 40, epochs=4, lr=5e-3,
                                   dead_after_tokens=2_000, heldout_chunks=2, device="cpu", log_every=50,
                                   checkpoint_every=10_000, normalize=normalize, seed=1))
    tr = Trainer(cfg, overwrite=True)
    tr.fit()
    s = float(tr.loader.scaling_factor)
    x = torch.from_numpy(np.asarray(sparse_data(n=64, d=32, n_features=32, k=3, seed=7)[0])) * 3.0
    sae = tr.sae.eval()
    with torch.no_grad():
        z = sae.encode(x * s)
        x_hat = sae.decode(z) / s
    rows = work / f"{name}.npz"
    np.savez(rows, x=x.numpy(), z=z.numpy(), x_hat=x_hat.numpy())
    return {"name": name, "export": str(tr.paths.saelens), "rows": str(rows), "scaling_factor": s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--saelens-python", default=DEFAULT_PY)
    a = ap.parse_args(argv)
    if not Path(a.saelens_python).exists():
        print(f"check skipped: no SAELens interpreter at {a.saelens_python}")
        return 0
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="check-saelens-"))
    x, _ = sparse_data(n=16 * 16 * 12, d=32, n_features=32, k=3, seed=0)
    store = write_store(work / "s.zarr", x * 3.0)  # mean norm != sqrt(d_in): normalisation does something
    cases = [train_case(work, store, arch, norm) for arch in ("baseline", "topk", "dyncorr")
             for norm in ("none", "expected_average_only_in")]
    r = subprocess.run([a.saelens_python, "-c", SAELENS_SIDE, json.dumps(cases), json.dumps(KEPT)],
                       capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        print(f"SAELens side failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
        return 1
    res = json.loads(line[len("RESULT "):])
    print(f"sae-lens {res['sae_lens']}: SAE.load_from_disk on our export, encode/decode of 64 raw rows vs ours")
    ok = True
    for c in cases:
        e = res[c["name"]]
        z_rel, x_rel = e["z_err"] / max(e["z_scale"], 1e-12), e["x_hat_err"] / max(e["x_hat_scale"], 1e-12)
        written = json.loads((Path(c["export"]) / "cfg.json").read_text())["metadata"]
        lost = [k for k in KEPT if e["metadata"][k] != written[k] or written[k] is None]
        good = z_rel <= TOL and x_rel <= TOL and not lost
        ok &= good
        print(f"  {c['name']:<36} scaling {c['scaling_factor']:.4f}  {e['class']} ({e['architecture']})  "
              f"max|dz|/max|z| {z_rel:.1e}  max|dx_hat|/max|x_hat| {x_rel:.1e}  L0 {e['l0']:.2f}  "
              f"metadata {'kept' if not lost else 'LOST ' + ','.join(lost)}  {'ok' if good else 'MISMATCH'}")
    print("all match" if ok else f"MISMATCH: above tolerance {TOL:g} or metadata lost")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
