"""regfit: weight regularization for PyTorch Lightning, and for any training loop.

Subclass :class:`RegModule`, add :class:`Regularization` callbacks (penalty, strength,
mode, selection, scale), and get data loss and penalty logged separately; or
:func:`attach` the same terms to any optimizer.
"""

from regfit.hooks import attach
from regfit.module import RegModule
from regfit.regularization import Regularization

__all__ = ["RegModule", "Regularization", "attach", "__version__"]
__version__ = "0.1.0"
