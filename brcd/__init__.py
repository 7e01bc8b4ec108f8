"""BRCD."""
