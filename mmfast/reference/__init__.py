"""Plain-PyTorch references, one file per op family, mirroring the upstream math line by line."""
