"""``sae features``: a static dashboard of an SAE's latents and its JSON contract (docs/features.md).

scan.py (the streaming pass) -> build.py (contexts, logit effects, neighbours -> the contract)
-> site.py (HTML/CSS/JS, written atomically); cli.py is the typer command.
"""

from trainer.features.build import FeaturesConfig, build_features
from trainer.features.site import write_site

__all__ = ["FeaturesConfig", "build_features", "write_site"]
