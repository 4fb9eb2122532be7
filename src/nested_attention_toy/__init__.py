"""The toy world: procedural subjects with ground-truth identity, and a miniature Stable Diffusion trained on them."""
