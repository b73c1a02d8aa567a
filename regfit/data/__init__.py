"""Image datasets without torchvision: files, downloads, in-memory batches, Lightning data modules.

The whole dataset lives in memory as two tensors (normalized float32 images ``(N, C, H, W)``
-- ``(N, 1, 28, 28)`` for MNIST -- and int64 labels); batches are cut from them by slicing or
``index_select``, never by a per-sample ``__getitem__`` and a collate function.

One concept per module, each importing only those listed after it:

- :mod:`~regfit.data.offline` -- ``python -m regfit.data --from-test-set SRC --out DIR``: an
  MNIST folder built offline from the official test set (:func:`build_split_from_test_set`);
- :mod:`~regfit.data.mnist` -- :class:`MNISTDataModule`, :class:`FashionMNISTDataModule`;
- :mod:`~regfit.data.datamodule` -- :class:`TensorDataModule`, the base of the data modules:
  a dataset declares ``image_shape`` and ``num_classes`` and implements ``load(part)``;
- :mod:`~regfit.data.batches` -- :func:`split_indices`, :class:`ShardedOrder`,
  :class:`TensorBatches` (resumable mid-epoch);
- :mod:`~regfit.data.files` -- :class:`DatasetFiles`: where a dataset's files are looked for,
  the MD5 policy, downloading the missing ones;
- :mod:`~regfit.data.download` -- one file from a list of mirrors (pooch: MD5, atomic move;
  transient failures retried);
- :mod:`~regfit.data.idx` -- the IDX file format: :func:`parse_idx`, :func:`read_idx`,
  :func:`write_idx`;
- :mod:`~regfit.data.checksums` (MD5s, ``MD5SUMS`` files), :mod:`~regfit.data.atomic`
  (atomic writes), :mod:`~regfit.data.errors` (:class:`DataError`).

``data_dir`` is the argument, else ``$REGFIT_DATA_DIR``, else ``./data`` (the shipped configs
leave it unset, so the variable applies to them). For MNIST it is searched first for the four
``*-ubyte.gz`` files of your own (e.g. written by ``python -m regfit.data --from-test-set``),
then in ``data_dir/MNIST/raw``, where downloads go (torchvision's layout). The MD5 policy is in
:mod:`regfit.data.files`.

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
