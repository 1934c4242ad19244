"""Image I/O and preprocessing (runtime-safe: numpy + Pillow only) and build-time datasets."""
