"""Read residual-stream hooks out of one forward pass, stopping after the deepest block.

Forward hooks on the decoder blocks copy out block outputs (``hook_resid_post``) and inputs
(``hook_resid_pre``). Once the last requested site has been read, the hook raises
``_StopForward``: no later block, no final norm and no ``lm_head`` ever run.
"""

from __future__ import annotations

from typing import Any

import torch

from actcache.hooks import HookSpec
from actcache.models import decoder_layers


class _StopForward(Exception):
    """Raised from inside the model once every requested activation is captured."""


def _first_tensor(x: Any) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


class ResidualCapture:
    """Context manager: ``with ResidualCapture(model, specs) as cap: acts = cap.run(ids)``."""

    def __init__(self, model: torch.nn.Module, specs: list[HookSpec], *, stop_early: bool = True):
        self.model = model
        self.specs = specs
        self.stop_early = stop_early
        self._layers = decoder_layers(model)
        self._acts: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        # Execution order of sites: input of block L comes before its output.
        self._last_site = max(specs, key=lambda s: 2 * s.layer + (s.kind == "hook_resid_post")).name

    def _save(self, name: str, t: torch.Tensor) -> None:
        self._acts[name] = t.detach()
        if self.stop_early and name == self._last_site:
            raise _StopForward

    def __enter__(self) -> "ResidualCapture":
        for s in self.specs:
            block = self._layers[s.layer]
            if s.kind == "hook_resid_post":
                h = block.register_forward_hook(
                    lambda mod, args, out, name=s.name: self._save(name, _first_tensor(out)))
            else:
                h = block.register_forward_pre_hook(
                    lambda mod, args, kwargs, name=s.name: self._save(
                        name, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True)
            self._handles.append(h)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations ``(batch, seq, d_model)`` per hook name, in the model's dtype."""
        self._acts = {}
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        missing = [s.name for s in self.specs if s.name not in self._acts]
        if missing:
            raise RuntimeError(f"forward pass produced no activation for {missing}")
        return self._acts
