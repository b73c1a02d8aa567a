"""regfit: weight regularization for PyTorch Lightning.

Subclass :class:`RegModule`, add :class:`Regularization` callbacks (penalty, strength,
mode, selection, scale), and get data loss and penalty logged separately.
"""

from regfit.module import RegModule
from regfit.regularization import Regularization

__all__ = ["RegModule", "Regularization", "__version__"]
__version__ = "0.1.0"
