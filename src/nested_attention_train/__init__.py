"""Training for nested_attention (never imported by the library)."""
