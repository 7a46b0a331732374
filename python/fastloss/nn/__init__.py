"""Module wrappers of the functional API, mirroring ``torch.nn``."""

from .spherical import SphericalSoftmaxLoss, TaylorSoftmaxLoss, ZLoss

__all__ = ["ZLoss", "SphericalSoftmaxLoss", "TaylorSoftmaxLoss"]
