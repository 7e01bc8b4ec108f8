"""Hamming search over packed binary codes: the packed store, flat (exhaustive) and multi-index hashing."""
