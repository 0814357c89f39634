"""LightningDataModules for the four DeepOBS test problems of "Dissecting Adam" (docs/problems.md).

=========================  ==========================  =========  ============  ==========
class                      problem                     classes    batch         inputs
=========================  ==========================  =========  ============  ==========
FashionMNISTDataModule     P1 fmnist_2c2d              10         128           [B,1,28,28]
CIFAR10DataModule          P2 cifar10_3c3d             10         128           [B,3,32,32]
CIFAR100DataModule         P3 cifar100_wrn404          100 fine   128           [B,3,32,32]
TolstoiDataModule          P4 tolstoi_char_rnn         83 chars   50 x 50 seq   [B,S] ids
=========================  ==========================  =========  ============  ==========

Every module takes ``data_dir``, ``batch_size``, ``num_workers``, ``seed``, ``download`` (plus
a few typed extras) and offers ``prepare_data()`` (check, download missing files if
``download=True``, verify checksums), ``setup()``, and the loaders ``train_dataloader()``,
``train_eval_dataloader()`` (a fixed training-set portion the size of the test set, no
augmentation), ``test_dataloader()`` (full test set) and ``val_dataloader()`` =
``[train_eval, test]`` (``dataloader_idx`` 0 = train-eval, 1 = test).  Batches are
``(inputs, targets)``; ``num_classes`` is a class attribute.  The CIFAR augmentation (TF
semantics, fixed order, no clipping) and the pixel-scale choice (``pixel_range``) are
documented in :mod:`lightning_msvag.datamodules.transforms`.

On-disk layout expected under ``data_dir`` (torchvision's layout for the image sets)::

    FashionMNIST/raw/train-images-idx3-ubyte      uncompressed IDX files (or the same
    FashionMNIST/raw/train-labels-idx1-ubyte      names + ".gz", torchvision's md5s)
    FashionMNIST/raw/t10k-images-idx3-ubyte
    FashionMNIST/raw/t10k-labels-idx1-ubyte

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
        (python pickles; or cifar-10-python.tar.gz in data_dir: prepare_data()
         unpacks the missing files from it)

    cifar-100-python/train, test, meta
        (python pickles; or cifar-100-python.tar.gz in data_dir, likewise)

    tolstoi/war-and-peace.txt                     optional (the package ships the text):
                                                  3,291,641 bytes, sha256 3ed0f41c...
    tolstoi/war-and-peace.ids-<sha>-v1.npz        id cache, written by the module

Files that are present are never overwritten or deleted; a present file with the wrong
checksum raises :class:`DataIntegrityError` naming the file and both checksums.  Missing
files without a working download raise :class:`DataUnavailableError` listing the exact
paths to place.  Both are ``RuntimeError`` and :class:`lightning_msvag.errors.UserError`
subclasses (the command reports them in one line).  Downloads use a 60 s network
timeout and a temporary file renamed into place after the checksum matched; archives
are unpacked file by file the same way.

Every training loader is a :class:`~lightning_msvag.resumable.ResumableDataLoader`: a Lightning
checkpoint stores its position in the epoch and its shuffle generator's state, and a run
resumed from it continues with exactly the batches the uninterrupted run would have seen
(docs/long_runs.md).
"""

from ._files import DataIntegrityError, DataUnavailableError
from .cifar import CIFAR10DataModule, CIFAR100DataModule
from .fashion_mnist import FashionMNISTDataModule
from .tolstoi import TolstoiDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataIntegrityError",
    "DataUnavailableError",
    "FashionMNISTDataModule",
    "TolstoiDataModule",
]
