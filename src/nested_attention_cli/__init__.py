"""The `nested-attention` command line: `generate` personalized images, or run the `demo`."""
