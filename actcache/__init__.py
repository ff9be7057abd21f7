"""actcache: residual-stream activations of Hugging Face causal LMs, cached in Zarr v3."""

__version__ = "0.1.0"
