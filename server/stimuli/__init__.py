"""Stimulus images (content-addressed) and ordered stimulus sets."""
