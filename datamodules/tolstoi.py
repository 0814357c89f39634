"""War and Peace, character level (docs/problems.md, P4 ``tolstoi_char_rnn``), exactly as DeepOBS.

Pipeline (each step a public function, so it can be tested and reused):

1. :func:`preprocess_war_and_peace` - decode UTF-8 keeping ``'\\r'``, drop lines 1-29, then
   lines 5-775 of the result, then lines 63850-64207 of that result (sed numbering) ->
   3,266,185 characters with a known sha256.
2. :func:`build_vocabulary` - characters by descending count, ties by first occurrence
   (83 symbols); ids as a uint8 array, vectorised with numpy.
3. :func:`split_train_test` - first ``ceil(0.8 N)`` characters train, the rest test.
4. :func:`make_stream_batches` - DeepOBS' batch layout: ``num_batches =
   floor((n - 1) / (batch_size * seq_len))``; inputs ``ids[:m]`` and targets ``ids[1:m + 1]``
   with ``m = num_batches * batch_size * seq_len``, each reshaped to ``[batch_size, m /
   batch_size]`` so that every row is one contiguous stream of the split, and batch ``i`` is
   columns ``[seq_len * i, seq_len * (i + 1))``.

Several processes (DDP): the rows are split, not the batches.  Rank ``r`` of ``W`` gets
rows ``[r * B / W, (r + 1) * B / W)`` of every batch (``B = batch_size``, which ``W`` must
divide), for all ``num_batches`` batches in order.  The global batch stays ``B x seq_len``
(50 x 50), each rank carries the recurrent state of its own rows from batch to batch, and
since the loss is a mean over equally many characters per rank, DDP's averaged gradient is
the single-process gradient: a run on ``W`` processes follows the one-process trajectory up
to float round-off (dropout draws aside).  Dealing whole batches to ranks (what Lightning's
automatic ``DistributedSampler`` would do) would break every stream after one batch; the
loaders therefore carry a pass-through ``DistributedSampler`` so Lightning injects none.
"""

import hashlib
import lzma
import warnings
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, SequentialSampler

from ._files import DataIntegrityError, describe_exception, verify_file
from lightning_msvag._io import atomic_open
from lightning_msvag.resumable import ResumableDataLoader, ResumableSampler

from ._image import (
    check_common_args,
    check_positive_int,
    distributed_shard,
    per_rank_batch_size,
)

#: Where DeepOBS downloads the text from (docs/problems.md); this package ships the same file.
TOLSTOI_URL = "https://github.com/AllenDowney/fluent-python-notebooks/raw/master/attic/sequences/war-and-peace.txt"
#: The raw file: size and sha256 (docs/problems.md).
TOLSTOI_RAW_SIZE = 3_291_641
TOLSTOI_RAW_SHA256 = "3ed0f41cfdf660846878943bad5b9d575bcae1e4a92ee9a7f43d3c9dba2af344"
#: The preprocessed text: length in characters and sha256 of its UTF-8 bytes (docs/problems.md).
TOLSTOI_TEXT_LENGTH = 3_266_185
TOLSTOI_TEXT_SHA256 = "48b5030ae673ac66db6e46c0915c04a8c18e0c83367a5836b2bae53154f339e4"
TOLSTOI_VOCAB_SIZE = 83
#: Line ranges deleted one after the other (1-based, inclusive, numbered in the current text).
TOLSTOI_DELETED_LINES = ((1, 29), (5, 775), (63850, 64207))
#: The copy of the raw file that ships with the package (xz-compressed, ~0.93 MB): Project
#: Gutenberg #2600 with its header and license, which allows redistribution.
EMBEDDED_TEXT = Path(__file__).resolve().parent / "embedded" / "war-and-peace.txt.xz"
_CACHE_FORMAT = 1


def embedded_war_and_peace() -> bytes:
    """The raw War and Peace file shipped with the package, checked against its sha256.

    Raises :class:`DataIntegrityError` if the packaged copy is missing or damaged (a broken
    installation: reinstall the package).
    """
    try:
        with lzma.open(EMBEDDED_TEXT) as f:
            raw = f.read()
    except (OSError, lzma.LZMAError, EOFError) as exc:
        raise DataIntegrityError(
            f"the packaged War and Peace text {EMBEDDED_TEXT} is unreadable ({describe_exception(exc)}); "
            "reinstall lightning-msvag, or place the text at <data_dir>/tolstoi/war-and-peace.txt"
        ) from None
    digest = hashlib.sha256(raw).hexdigest()
    if len(raw) != TOLSTOI_RAW_SIZE or digest != TOLSTOI_RAW_SHA256:
        raise DataIntegrityError(
            f"the packaged War and Peace text {EMBEDDED_TEXT} is damaged: {len(raw):,} bytes with sha256 "
            f"{digest}, expected {TOLSTOI_RAW_SIZE:,} bytes with sha256 {TOLSTOI_RAW_SHA256}; reinstall lightning-msvag"
        )
    return raw


def delete_lines(text: str, first: int, last: int) -> str:
    """``sed '<first>,<last>d'``: remove lines ``first..last`` (1-based, inclusive).

    Lines end at ``'\\n'`` only (a ``'\\r'`` before it stays part of the line), as for sed.
    """
    if not 1 <= first <= last:
        raise ValueError(f"need 1 <= first <= last, got {first}, {last}")
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    del lines[first - 1 : last]
    return "".join(lines)


def preprocess_war_and_peace(raw: bytes) -> str:
    """DeepOBS' preprocessing of the raw file bytes (header, table of contents, licence removed)."""
    text = raw.decode("utf-8")  # bytes -> str keeps '\r' (like open(..., newline=''))
    for first, last in TOLSTOI_DELETED_LINES:
        text = delete_lines(text, first, last)
    return text


def build_vocabulary(text: str) -> Tuple[str, np.ndarray]:
    """Vocabulary and ids: characters by descending count, ties by first occurrence.

    Returns ``(vocab, ids)`` where ``vocab[k]`` is the character with id ``k`` and ``ids`` is
    a uint8 array (int32 if more than 256 symbols) with one id per character of ``text``.
    Vectorised: ``np.unique`` over the UTF-32 code points, no per-character Python loop.
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    symbols, first_index, inverse, counts = np.unique(codes, return_index=True, return_inverse=True, return_counts=True)
    order = np.lexsort((first_index, -counts.astype(np.int64)))  # primary: -count, then first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    dtype = np.uint8 if len(symbols) <= 256 else np.int32
    ids = rank[inverse.reshape(-1)].astype(dtype)
    vocab = "".join(chr(int(c)) for c in symbols[order])
    return vocab, ids


def split_train_test(ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """First ``ceil(0.8 N)`` ids for training, the rest for testing (computed in integers)."""
    n_train = -(-4 * len(ids) // 5)
    return ids[:n_train], ids[n_train:]


def make_stream_batches(ids: np.ndarray, batch_size: int, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """DeepOBS' layout: ``(inputs, targets, num_batches)``, each of shape ``[batch_size, num_batches * seq_len]``.

    Row ``r`` of ``inputs`` is the contiguous stretch ``ids[r * L : (r + 1) * L]`` with
    ``L = num_batches * seq_len``; ``targets`` is the same shifted by one character.  Batch
    ``i`` is ``inputs[:, seq_len * i : seq_len * (i + 1)]``.  Raises ``ValueError`` if not
    even one batch fits.
    """
    num_batches = (len(ids) - 1) // (batch_size * seq_len)
    if num_batches < 1:
        raise ValueError(
            f"{len(ids)} characters are too few for one batch of batch_size={batch_size} x seq_len={seq_len} "
            f"(need at least {batch_size * seq_len + 1})."
        )
    m = num_batches * batch_size * seq_len
    inputs = torch.from_numpy(np.ascontiguousarray(ids[:m], dtype=np.int64)).reshape(batch_size, -1)
    targets = torch.from_numpy(np.ascontiguousarray(ids[1 : m + 1], dtype=np.int64)).reshape(batch_size, -1)
    return inputs, targets, num_batches


class StreamBatchDataset(Dataset):
    """Item ``i`` is batch ``i``: ``(inputs[:, S*i:S*(i+1)], targets[:, S*i:S*(i+1)])``, int64 ``[B, S]``.

    Use it with ``DataLoader(batch_size=None)`` (no re-batching, no shuffling) so that row
    ``r`` of batch ``i + 1`` continues row ``r`` of batch ``i`` (truncated BPTT).
    ``num_batches`` may limit it to the first batches (the train-eval set).
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, seq_len: int, num_batches: Optional[int] = None):
        if inputs.shape != targets.shape or inputs.ndim != 2:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be equal 2-D shapes")
        available = inputs.shape[1] // seq_len
        self.inputs, self.targets, self.seq_len = inputs, targets, seq_len
        self.num_batches = available if num_batches is None else min(num_batches, available)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if index < 0:
            index += self.num_batches
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} out of range ({self.num_batches} batches)")
        cols = slice(self.seq_len * index, self.seq_len * (index + 1))
        return self.inputs[:, cols].contiguous(), self.targets[:, cols].contiguous()


class TolstoiDataModule(pl.LightningDataModule):
    """War and Peace, character level, for the DeepOBS problem ``tolstoi_char_rnn`` (docs/problems.md, P4).

    Batches are ``(inputs, targets)``, both int64 ``[batch_size, seq_len]`` character ids
    (``targets`` = ``inputs`` shifted by one character).  Never shuffled: row ``r`` of
    batch ``i + 1`` continues row ``r`` of batch ``i``, so a recurrent state can be carried.
    At 50 x 50: 1045 training batches, 261 test batches; train-eval = the first 261
    training batches.  :meth:`val_dataloader` returns ``[train_eval, test]``.

    The text: ``<data_dir>/tolstoi/war-and-peace.txt`` if that file exists (it must be the
    file DeepOBS uses, 3,291,641 bytes, sha256 ``3ed0f41c...``), otherwise the copy that
    ships with the package (:data:`EMBEDDED_TEXT`, checked against the same sha256), so
    nothing needs downloading.  The encoded ids are cached in ``<data_dir>/tolstoi`` as
    ``war-and-peace.ids-<sha prefix>.npz`` (rebuilt if unreadable; skipped with a warning
    if the folder is not writable).

    Under DDP (``W`` processes) ``batch_size`` stays the global number of rows and each rank
    loads its contiguous block of ``batch_size / W`` rows (see the module docstring), so a
    rank's batches are ``[batch_size / W, seq_len]``; ``W`` must divide ``batch_size``.

    Attributes:
        num_classes: Vocabulary size, 83.
        vocab: After :meth:`setup`, the string of the 83 symbols in id order.

    Args:
        data_dir: Root data folder (the text lives in ``<data_dir>/tolstoi``).
        batch_size: Number of parallel streams (rows) per batch (DeepOBS: 50), summed over
            processes under DDP.
        seq_len: Characters per row and batch (DeepOBS: 50).
        num_workers: ``DataLoader`` worker processes (0 = main process).
        seed: Seeds the loaders' own generators (which only seed worker processes: Tolstoi is
            never shuffled); kept for the interface the image data modules share.
        download: Unused (the text ships with the package); accepted for the interface
            the image data modules share.
        pin_memory: Passed to the data loaders.
    """

    num_classes: int = TOLSTOI_VOCAB_SIZE
    val_dataloader_names: Tuple[str, str] = ("train_eval", "test")

    def __init__(
        self,
        data_dir: str = "./data",
        batch_size: int = 50,
        seq_len: int = 50,
        num_workers: int = 0,
        seed: int = 42,
        download: bool = True,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        check_common_args(data_dir, batch_size, num_workers, seed, download)
        check_positive_int("seq_len", seq_len, 1)
        if not isinstance(pin_memory, bool):
            raise ValueError(f"pin_memory must be True or False, got {pin_memory!r}")
        self.data_dir = str(data_dir)
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.download = download
        self.pin_memory = pin_memory
        self.save_hyperparameters()
        self.vocab: Optional[str] = None
        self.train_ids: Optional[np.ndarray] = None
        self.test_ids: Optional[np.ndarray] = None
        self.train_dataset: Optional[StreamBatchDataset] = None
        self.train_eval_dataset: Optional[StreamBatchDataset] = None
        self.test_dataset: Optional[StreamBatchDataset] = None
        self._shard: Optional[Tuple[int, int]] = None  # (rank, world size) the datasets were built for

    # --------------------------------------------------------------------- files
    @property
    def text_path(self) -> Path:
        """``<data_dir>/tolstoi/war-and-peace.txt``."""
        return Path(self.data_dir) / "tolstoi" / "war-and-peace.txt"

    @property
    def cache_path(self) -> Path:
        """The encoded-ids cache beside the text, keyed on the preprocessed text's sha256."""
        return self.text_path.with_name(f"war-and-peace.ids-{TOLSTOI_TEXT_SHA256[:16]}-v{_CACHE_FORMAT}.npz")

    def _raw_text(self) -> Tuple[bytes, Path]:
        """The raw file's bytes and where they came from: the user's file, else the packaged copy."""
        path = self.text_path
        if path.is_file():
            verify_file(path, "sha256", TOLSTOI_RAW_SHA256, expected_size=TOLSTOI_RAW_SIZE, what="War and Peace text")
            return path.read_bytes(), path
        return embedded_war_and_peace(), EMBEDDED_TEXT

    def _encode_from_text(self) -> Tuple[str, np.ndarray]:
        raw, source = self._raw_text()
        text = preprocess_war_and_peace(raw)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if len(text) != TOLSTOI_TEXT_LENGTH or digest != TOLSTOI_TEXT_SHA256:
            raise DataIntegrityError(
                f"Preprocessing {source} gave {len(text):,} characters with sha256 {digest}; "
                f"expected {TOLSTOI_TEXT_LENGTH:,} characters with sha256 {TOLSTOI_TEXT_SHA256}."
            )
        vocab, ids = build_vocabulary(text)
        if len(vocab) != TOLSTOI_VOCAB_SIZE:  # cannot happen for the verified text
            raise DataIntegrityError(f"vocabulary has {len(vocab)} symbols, expected {TOLSTOI_VOCAB_SIZE}")
        return vocab, ids

    def _load_cache(self) -> Optional[Tuple[str, np.ndarray]]:
        try:
            with np.load(self.cache_path, allow_pickle=False) as z:
                ids, codes = z["ids"], z["vocab"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # missing or unreadable: rebuilt from the text
        ok = (
            ids.dtype == np.uint8
            and ids.ndim == 1
            and len(ids) == TOLSTOI_TEXT_LENGTH
            and len(codes) == TOLSTOI_VOCAB_SIZE
            and int(ids.max()) < TOLSTOI_VOCAB_SIZE
        )
        if not ok:
            return None
        return "".join(chr(int(c)) for c in codes), ids

    def _save_cache(self, vocab: str, ids: np.ndarray) -> None:
        path = self.cache_path
        try:
            # atomic (concurrent processes never see half a cache) and following the umask
            with atomic_open(path, "wb") as f:
                np.savez(f, ids=ids, vocab=np.array([ord(c) for c in vocab], dtype=np.int32))
        except OSError as exc:  # e.g. a read-only data folder: work without the cache
            warnings.warn(f"could not write the Tolstoi cache {path}: {describe_exception(exc)}", stacklevel=2)

    def _encoded(self) -> Tuple[str, np.ndarray]:
        cached = self._load_cache()
        if cached is not None:
            return cached
        vocab, ids = self._encode_from_text()
        self._save_cache(vocab, ids)
        return vocab, ids

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Verify the text (the user's file if present, else the packaged copy) and build the id cache."""
        if self.text_path.is_file():  # a user's file is checked on every run, even with a cache
            self._raw_text()
        self._encoded()

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the ids (from the cache, else from the text), split them and lay out the batches.

        Under DDP, keep this rank's block of rows (rank and world size from the attached
        trainer); built again if the shard changed since the last call.
        """
        rank, world = distributed_shard(self.trainer)
        rows_per_rank = per_rank_batch_size(self.batch_size, world, type(self).__name__)
        if self.train_dataset is not None and self._shard == (rank, world):
            return
        if self.vocab is None:
            vocab, ids = self._encoded()
            self.vocab = vocab
            self.train_ids, self.test_ids = split_train_test(ids)
        rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
        train_x, train_y, _ = make_stream_batches(self.train_ids, self.batch_size, self.seq_len)
        test_x, test_y, num_test = make_stream_batches(self.test_ids, self.batch_size, self.seq_len)
        train_x, train_y, test_x, test_y = (t[rows] for t in (train_x, train_y, test_x, test_y))
        self.train_dataset = StreamBatchDataset(train_x, train_y, self.seq_len)
        self.train_eval_dataset = StreamBatchDataset(train_x, train_y, self.seq_len, num_batches=num_test)
        self.test_dataset = StreamBatchDataset(test_x, test_y, self.seq_len)
        self._shard = (rank, world)

    def decode(self, ids: "torch.Tensor | np.ndarray | List[int]") -> str:
        """Characters of a 1-D sequence of ids (after :meth:`setup`)."""
        if self.vocab is None:
            raise RuntimeError("call setup() first")
        return "".join(self.vocab[int(i)] for i in np.asarray(ids).reshape(-1))

    # --------------------------------------------------------------------- loaders
    def _loader(self, dataset: Optional[StreamBatchDataset], resumable: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                "TolstoiDataModule: call prepare_data() and setup() before asking for a data loader "
                "(a Lightning Trainer does this for you)."
            )
        # Under DDP the dataset already holds this rank's rows: a pass-through (1 replica)
        # DistributedSampler keeps every batch in order and stops Lightning injecting its own.
        # The loader's own generator (it only seeds worker processes) keeps iterator creation
        # off torch's global RNG, which dropout uses.
        common = dict(
            batch_size=None,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
        if resumable:  # in order; a checkpoint stores the position, a resumed run continues there
            return ResumableDataLoader(dataset, sampler=ResumableSampler(SequentialSampler(dataset)), **common)
        sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=False)
        return DataLoader(dataset, shuffle=False, sampler=sampler, **common)

    def train_dataloader(self) -> DataLoader:
        """All training batches in stream order (never shuffled), resumable mid-epoch.

        A :class:`~lightning_msvag.resumable.ResumableDataLoader`: a Lightning checkpoint stores
        how many batches of the epoch were trained on, and a resumed run continues with the
        next one (the model carries the matching recurrent state in the same checkpoint).
        """
        return self._loader(self.train_dataset, resumable=True)

    def train_eval_dataloader(self) -> DataLoader:
        """The first ``len(test_dataloader())`` training batches (261 at 50 x 50), in order."""
        return self._loader(self.train_eval_dataset)

    def test_dataloader(self) -> DataLoader:
        """All test batches in stream order."""
        return self._loader(self.test_dataset)

    def val_dataloader(self) -> List[DataLoader]:
        """``[train_eval_dataloader(), test_dataloader()]``: dataloader_idx 0 = train-eval, 1 = test."""
        return [self.train_eval_dataloader(), self.test_dataloader()]
