"""Every file name of a run directory, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONFIG = "config.json"
METRICS = "metrics.jsonl"
WEIGHTS = "sae.safetensors"
SAE_CONFIG = "sae_config.json"
SUMMARY = "summary.json"
EVAL = "eval.json"  # sae eval
CHECKPOINT = "checkpoint"
SAELENS = "saelens"
# Inside a checkpoint directory.
CKPT_MODEL = "model.safetensors"
CKPT_OPTIMIZER = "optimizer.pt"
CKPT_STATE = "state.json"
CKPT_RNG = "rng.safetensors"
# Inside a SAELens export directory (sae_lens.SAE.load_from_disk reads these).
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS

    @property
    def sae_config(self) -> Path:
        return self.root / SAE_CONFIG

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def eval(self) -> Path:
        return self.root / EVAL

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT

    @property
    def saelens(self) -> Path:
        return self.root / SAELENS


def run_paths(out: str | Path) -> RunPaths:
    return RunPaths(Path(out).expanduser())


def existing_run(path: str | Path) -> RunPaths:
    """The paths of a run directory that ``sae train`` wrote; a user error when it is not one."""
    from actcache.errors import ActcacheError

    p = run_paths(path)
    if not p.root.is_dir():
        raise ActcacheError(f"run dir {p.root} does not exist or is not a directory: pass the --out of a sae train run")
    if not p.config.exists():
        raise ActcacheError(f"{p.root} has no {CONFIG}: it is not a run directory of sae train (its --out)")
    return p
