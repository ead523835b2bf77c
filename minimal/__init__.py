"""minimal: attention calibration for long, noisy contexts, small enough to read.

The package is layered bottom-up: ``profiles``, ``models`` and ``data`` at the bottom,
``hooks`` and ``attention`` (the pure-PyTorch references) above them, the methods above
those, ``evaluate`` and the notebooks on top.
"""

from .models import load_model
from .profiles import get_profile

__all__ = ["load_model", "get_profile"]
__version__ = "0.1.0"
