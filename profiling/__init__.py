"""Memory profiling of SAE training configurations (see issue: sae profile-memory)."""
