"""SAE training on actcache stores (see issue: sae train)."""

from trainer.hugepages import request_huge_pages

# Before any trainer module imports torch: torch reads the setting at its first allocation.
request_huge_pages()
