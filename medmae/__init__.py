"""medmae: self pre-training of Vision Transformers with Masked Autoencoders for medical images, at cluster scale."""

from medmae._compat import patch_torchvision_ops

patch_torchvision_ops()

__version__ = "0.1.0"
