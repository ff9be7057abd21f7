"""Atomic checkpoints: weights and buffers in safetensors, optimiser state via
``torch.save``/``torch.load(weights_only=True)``, the rest as JSON.

A checkpoint is written into a temporary directory and swapped in by renames, so a crash
at any moment leaves the previous checkpoint (or, mid-swap, ``checkpoint.old``) intact.
:func:`prepare_run_dir` decides whether ``--out`` is a new run, one to resume, or an error.
In data-parallel runs only rank 0 writes; every rank reads (``Trainer._checkpoint``, ``_restore``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from actcache.errors import ActcacheError
from trainer import artifacts as A
from trainer.config import absolute_store

TMP_SUFFIX = ".tmp"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temp_file(parent: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """An exclusive new file beside its target, created 0666 & ~umask (mkstemp's would be 0600,
    and the rename would keep that mode on the final file)."""
    while True:
        tmp = parent / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def new_temp_dir(parent: Path, prefix: str) -> Path:
    """A new directory beside its target, 0777 & ~umask (mkdtemp's would be 0700)."""
    while True:
        tmp = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            tmp.mkdir(mode=0o777)
            return tmp
        except FileExistsError:
            continue


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = _new_temp_file(path.parent, f".{path.name}.", TMP_SUFFIX)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file creates its file 0600 whatever the umask: give it the mode an
    ordinary new file gets here."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path, metadata=metadata)
    os.chmod(path, mode)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    fd, tmp = _new_temp_file(path.parent, f".{path.name}.", TMP_SUFFIX)
    os.close(fd)
    try:
        _save_safetensors(tensors, tmp, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(root: Path) -> None:
    """What a kill mid-write leaves in a run dir: temp files (``.NAME.*.tmp``), checkpoint staging
    dirs (``.checkpoint.tmp-*``, each the size of a checkpoint) and export staging dirs. Only for a
    run dir nobody else is writing."""
    for d in (root, root / A.SAELENS):
        for tmp in d.glob(f".*{TMP_SUFFIX}") if d.is_dir() else ():
            tmp.unlink(missing_ok=True)
    for pattern in (f".{A.CHECKPOINT}.tmp-*", f".{A.SAELENS}.tmp-*", f".{A.SAELENS}.old-*"):
        for tmp in root.glob(pattern):
            shutil.rmtree(tmp, ignore_errors=True)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    return state


def _split_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors go to safetensors; modules' extra state (plain Python scalars) to JSON."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}


def save_checkpoint(ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    ckpt_dir = Path(ckpt_dir)
    tmp = new_temp_dir(ckpt_dir.parent, f".{ckpt_dir.name}.tmp-")
    tensors, extra = _split_state(model.state_dict())
    _save_safetensors(tensors, tmp / A.CKPT_MODEL)
    state = {**state, "module_extra_state": extra}
    torch.save(optimizer.state_dict(), tmp / A.CKPT_OPTIMIZER)
    _save_safetensors(_rng_state(), tmp / A.CKPT_RNG)
    (tmp / A.CKPT_STATE).write_text(json.dumps(state, indent=2))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    swap_dir(tmp, ckpt_dir)


def swap_dir(tmp: Path, target: Path) -> None:
    """Put the finished directory ``tmp`` at ``target`` by renames. A kill mid-swap leaves the
    previous ``target`` whole in ``target.old`` (``find_checkpoint`` falls back to it)."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(ckpt_dir: Path) -> Path | None:
    """The committed checkpoint; after a crash mid-swap, the previous one."""
    ckpt_dir = Path(ckpt_dir)
    for cand in (ckpt_dir, ckpt_dir.with_name(ckpt_dir.name + ".old")):
        if (cand / A.CKPT_STATE).exists():
            return cand
    return None


def load_checkpoint(ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    device: torch.device) -> dict[str, Any]:
    try:
        state = json.loads((ckpt_dir / A.CKPT_STATE).read_text())
        model.load_state_dict({**load_file(ckpt_dir / A.CKPT_MODEL, device=str(device)), **state.pop("module_extra_state", {})})
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(ckpt_dir / A.CKPT_OPTIMIZER, map_location=device, weights_only=True))
        rng = load_file(ckpt_dir / A.CKPT_RNG)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise ActcacheError(f"checkpoint {ckpt_dir} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                            "the run cannot resume from it; start it again with --overwrite") from None
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return state


RUNTIME_FIELDS = ("device", "log_every", "checkpoint_every", "out")  # may change on --resume


def _check_creatable(root: Path) -> None:
    """``root`` can be made: its nearest existing ancestor is a writable directory."""
    if root.exists() and not root.is_dir():
        raise ActcacheError(f"--out {root} is a file, not a directory: choose a directory path for the run")
    parent = root
    while not parent.exists():
        if parent == parent.parent:
            return
        parent = parent.parent
    if not parent.is_dir():
        raise ActcacheError(f"--out {root}: {parent} is a file, not a directory: choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ActcacheError(f"--out {root}: {parent} is not writable: choose a writable --out")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ActcacheError(f"cannot read {path} ({e}): the run directory is damaged; start it again with --overwrite") from None
    if not isinstance(old, dict):
        raise ActcacheError(f"{path} is not a run config: start the run again with --overwrite")
    return {**old, "store": absolute_store(str(old.get("store", "")))}  # older runs kept a relative path


def _never_started(paths: A.RunPaths) -> bool:
    """Only config.json was written (a failure or kill before the first checkpoint): nothing to lose."""
    return find_checkpoint(paths.checkpoint) is None and not paths.weights.exists() and not paths.metrics.exists()


def check_run_dir(flat_cfg: dict[str, Any], out: str, resume: bool, overwrite: bool) -> str:
    """What ``out`` is for this run: "new", "resume" or "overwrite"; ActcacheError when it cannot
    be used. Writes nothing (several runs are all checked before any is started)."""
    if not out:
        raise ActcacheError("no run directory: pass --out RUN_DIR")
    if resume and overwrite:
        raise ActcacheError("--resume and --overwrite exclude each other: pick one")
    paths = A.run_paths(out)
    _check_creatable(paths.root)
    if paths.config.exists():
        if resume:
            old = _read_config(paths.config)
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in flat_cfg.items()
                    if k not in RUNTIME_FIELDS and old.get(k) != v]
            if diff:
                raise ActcacheError(f"cannot resume {paths.root} with other parameters ({'; '.join(diff)}): "
                                    "use the original ones, or --overwrite")
            return "resume"
        if overwrite:
            return "overwrite"
        if _never_started(paths):
            return "new"
        raise ActcacheError(f"{paths.root} holds another run: pass --resume to continue it or --overwrite to replace it")
    if resume:
        what = "does not exist" if not paths.root.exists() else f"holds no run (no {A.CONFIG})"
        raise ActcacheError(f"nothing to resume: {paths.root} {what}; drop --resume to start a new run there")
    if paths.root.exists() and any(paths.root.iterdir()):
        raise ActcacheError(f"--out {paths.root} exists and is not a run directory: choose a new path")
    return "new"


def prepare_run_dir(flat_cfg: dict[str, Any], out: str, resume: bool, overwrite: bool) -> tuple[A.RunPaths, bool]:
    """Create (or check, for ``resume``) the run directory ``out`` and write ``config.json``;
    returns its paths and whether a checkpoint exists to resume from."""
    mode, paths = check_run_dir(flat_cfg, out, resume, overwrite), A.run_paths(out)
    if mode == "resume":
        remove_stale_temps(paths.root)
        return paths, find_checkpoint(paths.checkpoint) is not None
    if mode == "overwrite":
        shutil.rmtree(paths.root)
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ActcacheError(f"cannot create run directory {paths.root} ({e.strerror}): choose a writable --out") from None
    remove_stale_temps(paths.root)
    atomic_write_text(paths.config, json.dumps(flat_cfg, indent=2))
    return paths, False
