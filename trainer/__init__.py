"""SAE training on actcache stores (see issue: sae train)."""
