"""MNIST-format data without torchvision: files, downloads, in-memory batches, data modules.

The whole dataset lives in memory as two tensors (normalized float32 images ``(N, C, H, W)``,
``(N, 1, 28, 28)`` for MNIST, and int64 labels); batches are cut from them by slicing or ``index_select``, never by a
per-sample ``__getitem__`` and a collate function.

One concept per module:

- :mod:`~regfit.data.idx` -- the IDX file format: :func:`parse_idx`, :func:`read_idx`, :func:`write_idx`;
- :mod:`~regfit.data.files` -- where a dataset's files are and the MD5 policy: :class:`DatasetFiles`;
- :mod:`~regfit.data.download` -- fetching one file from a list of mirrors;
- :mod:`~regfit.data.batches` -- :func:`split_indices`, :class:`ShardedOrder`, :class:`TensorBatches`;
- :mod:`~regfit.data.datamodule` -- :class:`TensorDataModule`, the base of the data modules:
  a dataset declares ``image_shape`` and ``num_classes`` and implements ``load(part)``;
- :mod:`~regfit.data.mnist` -- the Lightning data modules :class:`MNISTDataModule`,
  :class:`FashionMNISTDataModule`;
- :mod:`~regfit.data.offline` -- ``python -m regfit.data --from-test-set SRC --out DIR``;
- beneath them: :mod:`~regfit.data.errors` (:class:`DataError`), :mod:`~regfit.data.checksums`
  (MD5s, ``MD5SUMS`` files), :mod:`~regfit.data.atomic` (atomic writes).

File layout
-----------
``data_dir`` (argument, else ``$REGFIT_DATA_DIR``, else ``./data``) is searched in this order,
and the first folder holding all four files wins:

1. ``data_dir`` itself -- a folder you filled: the four ``*-ubyte.gz`` files (or their
   uncompressed versions), e.g. one written by ``python -m regfit.data --from-test-set``;
2. ``data_dir/<folder>/raw`` (``folder`` is ``MNIST`` or ``FashionMNIST``) -- where downloads
   go. It is the layout torchvision uses, so an existing torchvision download is reused.

MD5 policy (``verify_md5=None``, the default): a MD5 guards a download, so files in the
download folder are checked against the official MD5s (a corrupt one is downloaded again);
files you put in ``data_dir`` yourself are checked against an ``MD5SUMS`` file beside them
when there is one, and otherwise only their IDX structure is validated. ``verify_md5=True``
requires the official files everywhere; ``verify_md5=False`` checks no MD5 at all.

Offline use::

    python -m regfit.data --from-test-set ../shared/data/mnist --out data/mnist-small
    regfit fit --config configs/mnist_l2.yaml --data.data_dir data/mnist-small
"""

# Beside the names of __all__, the constants stay importable from regfit.data as they were
# from the single module (notebooks/_setup.py imports FILE_STEMS).
from regfit.data.batches import ShardedOrder, TensorBatches, split_indices
from regfit.data.checksums import MD5SUMS
from regfit.data.datamodule import LabelledImages, TensorDataModule, TensorPair
from regfit.data.errors import DataError
from regfit.data.files import DEFAULT_DATA_DIR, ENV_DATA_DIR, DatasetFiles
from regfit.data.idx import IMAGES_MAGIC, LABELS_MAGIC, parse_idx, read_idx, write_idx
from regfit.data.mnist import (
    FILE_STEMS,
    IMAGE_SIZE,
    NUM_CLASSES,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from regfit.data.offline import build_split_from_test_set, main

__all__ = [
    "DataError",
    "DatasetFiles",
    "FashionMNISTDataModule",
    "LabelledImages",
    "MNISTDataModule",
    "ShardedOrder",
    "TensorBatches",
    "TensorDataModule",
    "TensorPair",
    "build_split_from_test_set",
    "main",
    "parse_idx",
    "read_idx",
    "split_indices",
    "write_idx",
]
