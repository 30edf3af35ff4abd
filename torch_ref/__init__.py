"""Small PyTorch references used only by the parity tests and benchmarks/ (never imported by the package)."""
