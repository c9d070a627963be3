"""Training utilities (Opacus-compatible paths: fastdp.utils.batch_memory_manager)."""
