"""Hook names, TransformerLens style (as SAELens and SAEBench use them).

``blocks.L.hook_resid_post`` is the residual stream *after* decoder block ``L``: the output
of block ``L``, i.e. ``hidden_states[L + 1]`` of a Hugging Face forward with
``output_hidden_states=True`` for every block but the last (HF hands back the final-normed
tensor there, so we always read block outputs with a forward hook instead).
``blocks.L.hook_resid_pre`` is the input of block ``L`` (= ``hook_resid_post`` of ``L - 1``,
or the scaled embeddings for ``L = 0``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from actcache.errors import ActcacheError

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre)$")
SUPPORTED = ("hook_resid_post", "hook_resid_pre")


@dataclass(frozen=True, order=True)
class HookSpec:
    """One residual-stream site; ``layer`` is the block index in the name."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"

    @property
    def last_block_needed(self) -> int:
        """Index of the deepest block the forward pass must run to produce this hook."""
        return self.layer if self.kind == "hook_resid_post" else self.layer - 1


def parse_hook(name: str) -> HookSpec:
    m = _HOOK_RE.match(name.strip())
    if not m:
        raise ActcacheError(
            f"unknown hook name {name!r}: use blocks.L.hook_resid_post or blocks.L.hook_resid_pre "
            "with L a block index, e.g. blocks.5.hook_resid_post"
        )
    return HookSpec(layer=int(m.group(1)), kind=m.group(2))


def parse_hooks(names: str | list[str] | tuple[str, ...], n_layers: int | None = None) -> list[HookSpec]:
    """Parse a comma list (or a list) of hook names; validate layers against ``n_layers``."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ActcacheError("no hooks given: pass --hooks blocks.L.hook_resid_post[,...]")
    specs = [parse_hook(n) for n in names]
    if len(set(specs)) != len(specs):
        raise ActcacheError(f"hook listed twice in {','.join(names)}: give each hook once")
    if n_layers is not None:
        for s in specs:
            if s.layer >= n_layers:
                raise ActcacheError(
                    f"hook {s.name} is out of range: the model has {n_layers} blocks "
                    f"(layers 0..{n_layers - 1})"
                )
    return sorted(specs)


def deepest_block(specs: list[HookSpec]) -> int:
    """Deepest block index the forward must run (-1: embeddings only)."""
    return max(s.last_block_needed for s in specs)
