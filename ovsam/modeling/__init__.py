"""Pure ``nn.Module``s: tensors in, tensors out."""

from .ovsam import OvsamImageFeatures, OvsamModel, RegionOutput
from .sam import SamModel

__all__ = ["OvsamImageFeatures", "OvsamModel", "RegionOutput", "SamModel"]
