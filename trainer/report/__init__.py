"""Comparing runs (``sae compare``) and the reproducible experiment (``sae experiment``)."""
