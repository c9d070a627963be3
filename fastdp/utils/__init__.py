"""Training utilities, at Opacus's paths: ``batch_memory_manager``, ``uniform_sampler``, ``module_utils``,
``tensor_utils``, ``packed_sequences``, ``per_sample_gradients_utils``, ``fast_gradient_clipping_utils``."""
