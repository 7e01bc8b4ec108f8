"""Hashing networks, model folders and the encoder that turns images into codes."""
