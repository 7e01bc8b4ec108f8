"""Cross-modal (image <-> text) hashing distilled from an unsupervised teacher (DUDCH-style,
docs/CROSSMODAL.md): paired data, the DJSRH-style teacher, the reconstructed similarity S, the
asymmetric student with DCC-optimised database codes, and its evaluation. Pure PyTorch, no Ray."""
