"""Small PyTorch references used only by the parity tests (never imported by the package)."""
