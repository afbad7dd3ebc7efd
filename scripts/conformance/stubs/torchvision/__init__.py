"""Import-time stand-in for torchvision (the CPU torch wheel has no matching torchvision)."""
__version__ = "0.0.0+stub"
from . import transforms  # noqa: E402,F401
