"""scalora: low-rank adapters whose scaling is principled."""
