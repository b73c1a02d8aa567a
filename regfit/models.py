"""Ready-made classifiers for the configs in ``configs/``: an :class:`MLP` and a small :class:`CNN`.

Both are :class:`~regfit.RegModule` subclasses trained on cross-entropy, logging
``val/acc`` and ``test/acc`` (torchmetrics) beside the data loss and penalties that
RegModule logs. Their classifier head is the attribute ``head``, so the ``last_layer``
selector keyword means it.

In YAML::

    model:
      class_path: regfit.models.MLP
      init_args: {widths: [512, 256], activation: relu, norm: none}
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from regfit.hyperparams import check_int
from regfit.module import RegModule

__all__ = ["Classifier", "MLP", "CNN", "ACTIVATIONS"]

Activation = Literal["relu", "gelu", "silu", "tanh"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
Norm = Literal["none", "batch", "layer"]


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}. Use one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


def _positive_ints(values: Sequence[int], what: str) -> list[int]:
    values = list(values)
    if not values or any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{what}={values!r} must be a non-empty list of positive integers, e.g. {what}=[512, 256].")
    return values


class Classifier(RegModule):
    """A RegModule for classification: cross-entropy data loss, accuracy on val/test.

    Subclasses build ``self.head`` (the output layer) and implement ``forward``.

    Args:
        num_classes: number of classes (logits per sample).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = check_int(type(self).__name__, "num_classes", num_classes, 2)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._batch_checked = False

    def check_inputs(self, x: Tensor) -> None:
        """Raise a ``ValueError`` naming the argument to change if ``x`` cannot be this
        model's input (default: no check)."""

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        """The first batch against the sizes the model was built for, so that a mismatch
        names the model's argument instead of failing inside a matmul or cross_entropy.
        Once per run: the labels' range costs one host synchronization."""
        if self._batch_checked:
            return
        self._batch_checked = True
        self.check_inputs(x)
        if y.numel() and not y.is_floating_point():  # float targets are class probabilities
            low, high = int(y.min()), int(y.max())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"{type(self).__name__}(num_classes={self.num_classes}) got class labels {low}…{high}: "
                    f"give num_classes={high + 1} or more (--model.init_args.num_classes={high + 1})."
                )

    def data_loss(self, batch: Any) -> Tensor:
        x, y = batch
        self._check_batch(x, y)
        return F.cross_entropy(self(x), y)

    def last_layer(self) -> nn.Module:
        return self.head

    def _eval_step(self, batch: Any, stage: str, metric: MulticlassAccuracy) -> Tensor:
        x, y = batch
        self._check_batch(x, y)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric(logits, y)
        self.log(f"{stage}/data_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Predicted class per sample."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=-1)


class MLP(Classifier):
    """Multilayer perceptron ``in → widths… → num_classes`` on flattened inputs.

    Each hidden block is Linear → [norm] → activation → [dropout].

    Args:
        widths: hidden layer widths, e.g. ``[512, 256]``.
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
        norm: ``none``, ``batch`` (BatchNorm1d) or ``layer`` (LayerNorm) after each hidden Linear.
        dropout: dropout probability after each hidden activation (0: none).
        in_features: input size after flattening (784 for 28×28 images).
        num_classes: output size.
        bias: give the hidden Linears a bias. Without one and with a norm, their weights are
            scale-invariant: weight decay then sets their effective learning rate.
    """

    def __init__(
        self,
        widths: Sequence[int] = (512, 256),
        activation: Activation = "relu",
        norm: Norm = "none",
        dropout: float = 0.0,
        in_features: int = 784,
        num_classes: int = 10,
        bias: bool = True,
    ) -> None:
        super().__init__(num_classes)
        widths = _positive_ints(widths, "widths")
        check_int("MLP", "in_features", in_features, 1)
        if norm not in ("none", "batch", "layer"):
            raise ValueError(f"Unknown norm {norm!r}. Use 'none', 'batch' or 'layer'.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1).")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        n_in = in_features
        for width in widths:
            layers.append(nn.Linear(n_in, width, bias=bias))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(width))
            elif norm == "layer":
                layers.append(nn.LayerNorm(width))
            layers.append(_activation(activation))
            if dropout:
                layers.append(nn.Dropout(dropout))
            n_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(n_in, num_classes)
        # Lightning's convention for a batch of the input's shape: its model summary shows
        # layer sizes from it, and regfit traces it for the units GroupLasso and thinning see.
        self.example_input_array = torch.zeros(1, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.flatten(1)))

    def check_inputs(self, x: Tensor) -> None:
        want = self.hparams.in_features
        n = x[0].numel() if x.ndim >= 2 else None
        if n != want:
            raise ValueError(
                f"MLP(in_features={want}) got a batch of shape {tuple(x.shape)}"
                + (f", {n} values per sample: give in_features={n} (--model.init_args.in_features={n})." if n else
                   ": expected (batch, features…).")
            )


class CNN(Classifier):
    """A small convolutional net: [Conv3×3 → [BatchNorm] → activation → MaxPool2]… → Linear → head.

    With the defaults on 28×28 MNIST: 1→32→64 channels, 7×7 maps, a 128-unit hidden layer.

    Args:
        channels: output channels of each conv block (each halves the spatial size).
        hidden: width of the fully connected layer before the head (0: none).
        activation: ``relu``, ``gelu``, ``silu`` or ``tanh``.
        batch_norm: BatchNorm2d after each conv.
        in_channels: input channels.
        image_size: input height = width.
        num_classes: output size.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        activation: Activation = "relu",
        batch_norm: bool = False,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
    ) -> None:
        super().__init__(num_classes)
        channels = _positive_ints(channels, "channels")
        for value, what, low in ((hidden, "hidden", 0), (in_channels, "in_channels", 1), (image_size, "image_size", 1)):
            check_int("CNN", what, value, low)
        if image_size >> len(channels) < 1:
            raise ValueError(f"image_size={image_size} is too small for {len(channels)} pooling blocks.")
        self.save_hyperparameters()
        blocks: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1))
            if batch_norm:
                blocks.append(nn.BatchNorm2d(c_out))
            blocks += [_activation(activation), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        n_flat = c_in * (image_size >> len(channels)) ** 2
        self.fc = nn.Sequential(nn.Linear(n_flat, hidden), _activation(activation)) if hidden else nn.Identity()
        self.head = nn.Linear(hidden or n_flat, num_classes)
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)  # as in MLP

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.fc(self.features(x).flatten(1)))

    def check_inputs(self, x: Tensor) -> None:
        c, s = self.hparams.in_channels, self.hparams.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(
                f"CNN(in_channels={c}, image_size={s}) takes batches of shape (N, {c}, {s}, {s}), got "
                f"{tuple(x.shape)}: give in_channels and image_size of the data (--model.init_args.in_channels, "
                "--model.init_args.image_size; square images)."
            )

