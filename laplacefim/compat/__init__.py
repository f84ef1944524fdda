"""Compatibility layers for other libraries' APIs: :mod:`laplacefim.compat.laplace_torch`."""
