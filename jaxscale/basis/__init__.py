"""Basis functions: truncated Gaussian smoothers and DIALS real spherical harmonics (numpy)."""
