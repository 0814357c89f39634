"""Tests of the data modules (datamodules/): real loading code on small files in the real formats.

Nothing here touches the network: an autouse fixture makes ``urllib.request.urlopen`` raise.
Tolstoi is tested on the real text that ships with the package.
"""

import colorsys
import gzip
import hashlib
import io
import math
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning_msvag.datamodules
from lightning_msvag.datamodules import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataIntegrityError,
    DataUnavailableError,
    FashionMNISTDataModule,
    TolstoiDataModule,
)
from lightning_msvag.datamodules import tolstoi as tolstoi_mod
from lightning_msvag.datamodules.transforms import (
    PerImageStandardization,
    TFRandomBrightness,
    TFRandomContrast,
    adjust_saturation_hsv,
    cifar_eval_transform,
    cifar_train_transform,
)

from tests.helpers.fakes import (
    gzip_fake_fashion_mnist,
    patch_cifar_md5,
    write_fake_cifar10,
    write_fake_cifar100,
    write_fake_fashion_mnist,
)



@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs offline: any urlopen raises URLError unless a test patches it again."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def forbid_network(monkeypatch):
    def fail(*args, **kwargs):
        pytest.fail("the network was used although the file is present")

    monkeypatch.setattr(urllib.request, "urlopen", fail)


class FakeResponse(io.BytesIO):
    """Stands in for the object urlopen returns (context manager with .read(n))."""


def serve(monkeypatch, payload: bytes):
    calls = []

    def fake_urlopen(request, timeout=None):
        calls.append((getattr(request, "full_url", request), timeout))
        return FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return calls


def leftovers(folder: Path):
    return sorted(p.name for p in folder.rglob("*.part"))


# ====================================================================== Tolstoi
def place_war_and_peace(data_dir: Path, nbytes=None) -> Path:
    """A user's own copy of the text in <data_dir>/tolstoi (the packaged one, maybe cut short)."""
    dest = data_dir / "tolstoi" / "war-and-peace.txt"
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = tolstoi_mod.embedded_war_and_peace()
    dest.write_bytes(data if nbytes is None else data[:nbytes])
    return dest


@pytest.fixture(scope="module")
def tolstoi(tmp_path_factory):
    """The data module on the packaged text (nothing placed in data_dir)."""
    data_dir = tmp_path_factory.mktemp("tolstoi_data")
    dm = TolstoiDataModule(str(data_dir), download=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_tolstoi_vocabulary_split_and_batch_counts(tolstoi):
    dm = tolstoi
    assert dm.num_classes == 83 and len(dm.vocab) == 83 and len(set(dm.vocab)) == 83
    assert len(dm.train_ids) == 2_612_948 and len(dm.test_ids) == 653_237
    assert len(dm.train_ids) == math.ceil(0.8 * (2_612_948 + 653_237))
    assert len(dm.train_dataloader()) == 1045
    assert len(dm.test_dataloader()) == 261
    assert len(dm.train_eval_dataloader()) == 261
    val = dm.val_dataloader()
    assert isinstance(val, list) and [len(v) for v in val] == [261, 261]
    assert dm.vocab[0] == " "  # the most frequent character
    assert "\r" in dm.vocab and "\n" in dm.vocab


def test_tolstoi_first_batch_and_shift(tolstoi):
    x, y = next(iter(tolstoi.train_dataloader()))
    assert x.shape == y.shape == (50, 50) and x.dtype == y.dtype == torch.int64
    assert tolstoi.decode(x[0]).startswith("WAR AND PEACE\r\n\r\nBy Leo Tolstoy")
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets = inputs shifted by one
    assert int(x.max()) < 83 and int(x.min()) >= 0


def test_tolstoi_rows_are_contiguous_streams(tolstoi):
    xs, ys = zip(*tolstoi.train_dataloader())
    for i in range(len(xs) - 1):  # row r of batch i+1 continues row r of batch i
        assert torch.equal(xs[i + 1][:, 0], ys[i][:, -1])
    ids = torch.from_numpy(tolstoi.train_ids.astype(np.int64))
    m = 1045 * 50 * 50
    assert torch.equal(torch.cat(xs, dim=1), ids[:m].reshape(50, -1))
    assert torch.equal(torch.cat(ys, dim=1), ids[1 : m + 1].reshape(50, -1))
    # train-eval = the first 261 training batches; no shuffling: a second pass is identical
    for (a, b), (c, d) in zip(tolstoi.train_eval_dataloader(), zip(xs, ys)):
        assert torch.equal(a, c) and torch.equal(b, d)
    x0, _ = next(iter(tolstoi.train_dataloader()))
    assert torch.equal(x0, xs[0])
    test_ids = torch.from_numpy(tolstoi.test_ids.astype(np.int64))
    tx = torch.cat([x for x, _ in tolstoi.test_dataloader()], dim=1)
    assert torch.equal(tx, test_ids[: 261 * 2500].reshape(50, -1))


def test_tolstoi_cache_is_used_and_rebuilt(tolstoi, monkeypatch):
    cache = tolstoi.cache_path
    assert cache.is_file()

    def boom(*a, **k):
        raise AssertionError("preprocessing ran although the cache is there")

    monkeypatch.setattr(tolstoi_mod, "preprocess_war_and_peace", boom)
    dm = TolstoiDataModule(tolstoi.data_dir, download=False)
    dm.setup()
    assert dm.vocab == tolstoi.vocab and np.array_equal(dm.train_ids, tolstoi.train_ids)
    monkeypatch.undo()
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    saved = cache.read_bytes()
    try:
        for broken in (b"garbage", saved[: len(saved) // 2]):  # a broken cache is rebuilt, not an error
            cache.write_bytes(broken)
            dm = TolstoiDataModule(tolstoi.data_dir, download=False)
            dm.setup()
            assert np.array_equal(dm.test_ids, tolstoi.test_ids)
            assert cache.read_bytes() != broken and dm._load_cache()[0] == tolstoi.vocab  # rewritten
    finally:
        cache.write_bytes(saved)


def test_tolstoi_embedded_text_is_the_deepobs_file_and_needs_no_network(tmp_path, monkeypatch):
    forbid_network(monkeypatch)
    raw = tolstoi_mod.embedded_war_and_peace()
    assert len(raw) == 3_291_641
    assert hashlib.sha256(raw).hexdigest() == "3ed0f41cfdf660846878943bad5b9d575bcae1e4a92ee9a7f43d3c9dba2af344"
    dm = TolstoiDataModule(str(tmp_path), download=True)
    dm.prepare_data()
    dm.setup()
    assert not dm.text_path.exists()  # nothing downloaded or copied; only the id cache written
    assert sorted(p.name for p in (tmp_path / "tolstoi").iterdir()) == [dm.cache_path.name]
    assert len(dm.train_dataloader()) == 1045


def test_tolstoi_user_file_takes_precedence_over_the_embedded_copy(tmp_path, monkeypatch):
    place_war_and_peace(tmp_path)
    monkeypatch.setattr(tolstoi_mod, "embedded_war_and_peace", lambda: pytest.fail("packaged copy read"))
    dm = TolstoiDataModule(str(tmp_path), download=False)
    dm.prepare_data()
    dm.setup()
    assert dm.decode(next(iter(dm.train_dataloader()))[0][0]).startswith("WAR AND PEACE")


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_tolstoi_damaged_embedded_copy_is_a_clear_error(tmp_path, monkeypatch, damage):
    import lzma

    raw = tolstoi_mod.embedded_war_and_peace()
    broken = tmp_path / "broken.txt.xz"
    if damage == "truncated":
        broken.write_bytes(tolstoi_mod.EMBEDDED_TEXT.read_bytes()[:50_000])
    elif damage == "flipped":
        broken.write_bytes(lzma.compress(raw[:1000] + b"X" + raw[1001:]))
    monkeypatch.setattr(tolstoi_mod, "EMBEDDED_TEXT", broken)
    dm = TolstoiDataModule(str(tmp_path / "data"), download=True)
    with pytest.raises(DataIntegrityError, match="reinstall lightning-msvag") as err:
        dm.prepare_data()
    assert str(broken) in str(err.value)
    if damage == "flipped":
        assert tolstoi_mod.TOLSTOI_RAW_SHA256 in str(err.value)


@pytest.mark.parametrize("nbytes, word", [(1_000_000, "TRUNCATED"), (0, "EMPTY")])
def test_tolstoi_checksum_error_names_file_and_checksums(tmp_path, monkeypatch, nbytes, word):
    forbid_network(monkeypatch)
    path = place_war_and_peace(tmp_path, nbytes)
    content = path.read_bytes()
    dm = TolstoiDataModule(str(tmp_path), download=True)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DataIntegrityError) as err:
            step()
        msg = str(err.value)
        assert str(path) in msg and word in msg
        assert tolstoi_mod.TOLSTOI_RAW_SHA256 in msg
        assert hashlib.sha256(content).hexdigest() in msg
        if nbytes:
            assert f"{nbytes:,} bytes" in msg and "3,291,641" in msg
    assert path.read_bytes() == content  # never deleted or replaced


def test_tolstoi_argument_validation(tolstoi):
    for kwargs in ({"batch_size": 0}, {"seq_len": 0}, {"batch_size": True}, {"num_workers": -1}, {"download": "yes"}):
        with pytest.raises(ValueError):
            TolstoiDataModule("./data", **kwargs)
    dm = TolstoiDataModule(tolstoi.data_dir, batch_size=1000, seq_len=1000, download=False)
    with pytest.raises(ValueError, match="too few"):
        dm.setup()
    with pytest.raises(RuntimeError, match="setup"):
        TolstoiDataModule(tolstoi.data_dir).train_dataloader()


def test_tolstoi_other_batch_shapes(tolstoi):
    dm = TolstoiDataModule(tolstoi.data_dir, batch_size=7, seq_len=11, download=False)
    dm.setup()
    n = (2_612_948 - 1) // 77
    assert len(dm.train_dataloader()) == n and len(dm.test_dataloader()) == (653_237 - 1) // 77
    x, y = dm.train_dataset[n - 1]
    assert x.shape == (7, 11) and torch.equal(x[:, 1:], y[:, :-1])


def test_tolstoi_pure_functions():
    text = "l1\r\nl2\nl3\r\nl4\nl5"  # no trailing newline on the last line
    assert tolstoi_mod.delete_lines(text, 2, 3) == "l1\r\nl4\nl5"
    assert tolstoi_mod.delete_lines(text, 5, 9) == "l1\r\nl2\nl3\r\nl4\n"
    vocab, ids = tolstoi_mod.build_vocabulary("abcbca d")  # counts b2 c2 a2; ties by first occurrence
    assert vocab == "abc d" and vocab[ids[1]] == "b" and "".join(vocab[i] for i in ids) == "abcbca d"
    train, test = tolstoi_mod.split_train_test(np.arange(11))
    assert len(train) == 9 and len(test) == 2  # ceil(8.8) = 9
    x, y, nb = tolstoi_mod.make_stream_batches(np.arange(23), batch_size=2, seq_len=5)
    assert nb == 2
    assert x.tolist() == [list(range(10)), list(range(10, 20))]
    assert y.tolist() == [list(range(1, 11)), list(range(11, 21))]
    with pytest.raises(ValueError):
        tolstoi_mod.make_stream_batches(np.arange(10), batch_size=2, seq_len=5)


# ====================================================================== Fashion-MNIST
def first_epoch_labels(dm):
    return torch.cat([y for _, y in dm.train_dataloader()]).tolist()


def test_fashion_mnist_loads_real_format(tmp_path):
    fake = write_fake_fashion_mnist(tmp_path, n_train=300, n_test=100)
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=32, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(dm.train_dataloader()) == 300 // 32  # remainder dropped
    assert len(dm.train_eval_dataset) == len(dm.test_dataset) == 100
    val = dm.val_dataloader()
    assert isinstance(val, list) and len(val) == 2
    tx, ty = next(iter(val[1]))
    assert torch.equal(ty, torch.from_numpy(fake.test_labels[:32]))
    assert torch.equal(tx[:, 0], torch.from_numpy(fake.test_images[:32]).float() / 255)  # exactly ToTensor
    ex, ey = next(iter(val[0]))  # train-eval: first training images, unaugmented
    assert torch.equal(ex[:, 0], torch.from_numpy(fake.train_images[:32]).float() / 255)
    labels = torch.cat([y for _, y in dm.test_dataloader()])
    assert len(labels) == 100 and int(labels.min()) >= 0 and int(labels.max()) < 10


def test_fashion_mnist_shuffling_is_seeded(tmp_path):
    write_fake_fashion_mnist(tmp_path, n_train=200, n_test=40)

    def make(seed):
        dm = FashionMNISTDataModule(str(tmp_path), batch_size=20, seed=seed, download=False)
        dm.setup()
        return dm

    a, b, c = make(1), make(1), make(2)
    assert first_epoch_labels(a) == first_epoch_labels(b)
    assert first_epoch_labels(a) != first_epoch_labels(c)
    loader = a.train_dataloader()  # consecutive epochs of one loader are different permutations
    e1 = torch.cat([y for _, y in loader]).tolist()
    e2 = torch.cat([y for _, y in loader]).tolist()
    assert e1 != e2 and sorted(e1) == sorted(e2)


def test_fashion_mnist_missing_files(tmp_path):
    dm = FashionMNISTDataModule(str(tmp_path), download=False)
    with pytest.raises(DataUnavailableError) as err:
        dm.prepare_data()
    msg = str(err.value)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert str(tmp_path / "FashionMNIST" / "raw" / name) in msg
    with pytest.raises(DataUnavailableError):
        dm.setup()


def test_fashion_mnist_download_failure_is_clear(tmp_path):
    dm = FashionMNISTDataModule(str(tmp_path), download=True)
    with pytest.raises(DataUnavailableError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "URLError" in msg and str(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in msg
    assert leftovers(tmp_path) == [] and not list((tmp_path / "FashionMNIST" / "raw").glob("*ubyte*"))


def test_fashion_mnist_download_failure_points_offline_and_leaves_no_folders(tmp_path):
    """Issue 19 item 9: the error names the offline recipe; the tree it names is not created."""
    data = tmp_path / "data"
    with pytest.raises(DataUnavailableError) as err:
        FashionMNISTDataModule(str(data), download=True).prepare_data()
    assert "docs/fashion_mnist_offline.md" in str(err.value)
    assert not data.exists(), sorted(str(p) for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_data_files_follow_the_umask(tmp_path, monkeypatch, umask):
    """Downloads, copies and the Tolstoi id cache get 0666 & ~umask, like any other file (not 0600/0644)."""
    from lightning_msvag.datamodules._files import download_file, write_atomically

    payload = b"some bytes"
    serve(monkeypatch, payload)
    old = os.umask(umask)
    try:
        download_file("https://example.invalid/f", tmp_path / "dl" / "f.bin", "md5", hashlib.md5(payload).hexdigest())
        write_atomically(tmp_path / "copy.bin", io.BytesIO(payload))
        dm = TolstoiDataModule(str(tmp_path / "tolstoi"), download=False)
        dm.prepare_data()
    finally:
        os.umask(old)
    files = [tmp_path / "dl" / "f.bin", tmp_path / "copy.bin", dm.cache_path]
    for path in files:
        assert path.is_file() and (path.stat().st_mode & 0o777) == 0o666 & ~umask, (path, oct(path.stat().st_mode))
    assert leftovers(tmp_path) == []


def test_fashion_mnist_truncated_file(tmp_path, monkeypatch):
    forbid_network(monkeypatch)
    write_fake_fashion_mnist(tmp_path, n_train=50, n_test=20)
    path = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:5000])
    dm = FashionMNISTDataModule(str(tmp_path), download=True)
    with pytest.raises(DataIntegrityError) as err:
        dm.prepare_data()
    assert str(path) in str(err.value) and "TRUNCATED" in str(err.value)
    assert path.stat().st_size == 5000  # left untouched


def test_fashion_mnist_accepts_gz_archives(tmp_path, monkeypatch):
    forbid_network(monkeypatch)
    fake = write_fake_fashion_mnist(tmp_path, n_train=40, n_test=20)
    md5s = gzip_fake_fashion_mnist(tmp_path)
    raw = fake.folder
    for name in fake.md5:
        (raw / name).unlink()
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "resources", [(n, md5s[n]) for n, _ in FashionMNIST.resources])
    dm = FashionMNISTDataModule(str(tmp_path), batch_size=8, download=False)
    dm.prepare_data()
    assert all((raw / n).is_file() for n in fake.md5)
    dm.setup()
    assert len(dm.test_dataset) == 20
    # a corrupt archive is reported with both checksums and left in place
    (raw / "t10k-labels-idx1-ubyte").unlink()
    gz = raw / "t10k-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(b"not the same"))
    with pytest.raises(DataIntegrityError) as err:
        FashionMNISTDataModule(str(tmp_path), download=True).prepare_data()
    assert str(gz) in str(err.value) and md5s[gz.name] in str(err.value) and gz.exists()


# ====================================================================== CIFAR
def test_cifar10_loads_real_format(tmp_path, monkeypatch):
    fake = write_fake_cifar10(tmp_path, n_train=250, n_test=60)
    patch_cifar_md5(monkeypatch, CIFAR10DataModule, tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), batch_size=16, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_classes == 10
    assert len(dm.train_eval_dataset) == len(dm.test_dataset) == 60
    assert len(dm.train_dataloader()) == 250 // 16
    tx, ty = next(iter(dm.test_dataloader()))
    assert tx.shape == (16, 3, 32, 32) and tx.dtype == torch.float32 and ty.dtype == torch.int64
    assert torch.equal(ty, torch.from_numpy(fake.test_labels[:16]))
    flat = tx.reshape(16, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1, correction=0), torch.ones(16), atol=1e-4, rtol=0)
    # test image 0 is exactly the standardised file image (HWC -> CHW)
    img = torch.from_numpy(fake.test_images[0]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(tx[0], (img - img.mean()) / img.std(correction=0))
    torch.manual_seed(0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert int(y.min()) >= 0 and int(y.max()) < 10
    flat = x.reshape(16, -1)  # augmented images are standardised too
    torch.testing.assert_close(flat.mean(1), torch.zeros(16), atol=1e-5, rtol=0)
    val = dm.val_dataloader()
    assert isinstance(val, list) and [len(v.dataset) for v in val] == [60, 60]
    ex, _ = next(iter(val[0]))  # train-eval: unaugmented first training images
    img = torch.from_numpy(fake.train_images[0]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(ex[0], (img - img.mean()) / img.std(correction=0))
    aug0 = dm.train_dataset[0][0]
    assert aug0.shape == (3, 32, 32) and not torch.allclose(aug0, ex[0])  # augmentation is on


def test_cifar10_shuffling_is_seeded(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, n_train=100, n_test=20)
    patch_cifar_md5(monkeypatch, CIFAR10DataModule, tmp_path)

    def make(seed):
        dm = CIFAR10DataModule(str(tmp_path), batch_size=25, seed=seed, download=False, augment=False)
        dm.setup()
        return dm

    a, b, c = make(3), make(3), make(4)
    assert first_epoch_labels(a) == first_epoch_labels(b) != first_epoch_labels(c)
    xa = torch.cat([x for x, _ in a.train_dataloader()])
    xb = torch.cat([x for x, _ in b.train_dataloader()])
    assert torch.equal(xa, xb)


def test_cifar100_fine_labels(tmp_path, monkeypatch):
    fake = write_fake_cifar100(tmp_path, n_train=200, n_test=50)
    patch_cifar_md5(monkeypatch, CIFAR100DataModule, tmp_path)
    dm = CIFAR100DataModule(str(tmp_path), batch_size=25, download=False)
    dm.prepare_data()
    dm.setup()
    assert dm.num_classes == 100
    labels = torch.cat([y for _, y in dm.test_dataloader()])
    assert torch.equal(labels, torch.from_numpy(fake.test_labels))  # fine, not coarse
    assert int(labels.max()) >= 20  # coarse labels would all be < 20
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (25, 3, 32, 32) and int(y.max()) < 100
    assert len(dm.train_eval_dataset) == 50


@pytest.mark.parametrize("module, writer, first", [
    (CIFAR10DataModule, write_fake_cifar10, "data_batch_1"),
    (CIFAR100DataModule, write_fake_cifar100, "train"),
])
def test_cifar_md5_mismatch_is_clear(tmp_path, monkeypatch, module, writer, first):
    forbid_network(monkeypatch)
    fake = writer(tmp_path, 20, 10)
    before = {n: (fake.folder / n).read_bytes() for n in fake.md5}
    expected = dict(module.dataset_cls.train_list)[first]
    for download in (False, True):
        dm = module(str(tmp_path), download=download)
        with pytest.raises(DataIntegrityError) as err:
            dm.prepare_data()
        msg = str(err.value)
        assert str(fake.folder / first) in msg
        assert f"expected md5 {expected}" in msg and f"actual md5 {fake.md5[first]}" in msg
    with pytest.raises(DataIntegrityError, match="md5"):
        module(str(tmp_path), download=False).setup()
    assert {n: (fake.folder / n).read_bytes() for n in fake.md5} == before  # nothing deleted or changed


@pytest.mark.parametrize("module, folder, names", [
    (CIFAR10DataModule, "cifar-10-batches-py", ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]),
    (CIFAR100DataModule, "cifar-100-python", ["train", "test", "meta"]),
])
def test_cifar_download_failure_is_clear(tmp_path, module, folder, names):
    dm = module(str(tmp_path), download=True)
    with pytest.raises(DataUnavailableError) as err:
        dm.prepare_data()
    msg = str(err.value)
    assert "URLError" in msg and module.dataset_cls.url in msg
    for name in names:
        assert str(tmp_path / folder / name) in msg
    assert list(tmp_path.iterdir()) == []  # no partial download left behind
    with pytest.raises(DataUnavailableError, match="download=False"):
        module(str(tmp_path), download=False).prepare_data()


def test_cifar_archive_is_unpacked(tmp_path, monkeypatch):
    forbid_network(monkeypatch)
    staging = tmp_path / "staging"
    fake = write_fake_cifar10(staging, n_train=30, n_test=10)
    patch_cifar_md5(monkeypatch, CIFAR10DataModule, staging)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    archive = data_dir / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fake.folder, arcname="cifar-10-batches-py")
    monkeypatch.setattr(CIFAR10DataModule.dataset_cls, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    placed = data_dir / "cifar-10-batches-py" / "data_batch_1"  # a file the user already placed
    placed.parent.mkdir()
    shutil.copy(fake.folder / "data_batch_1", placed)
    os.utime(placed, ns=(1, 1))
    dm = CIFAR10DataModule(str(data_dir), batch_size=5, download=False)
    dm.prepare_data()
    assert placed.stat().st_mtime_ns == 1  # only the missing files were unpacked
    assert sorted(p.name for p in placed.parent.iterdir()) == sorted(fake.md5)
    dm.setup()
    assert len(dm.test_dataset) == 10 and archive.exists()
    # an archive with the wrong checksum is reported and kept
    (placed.parent / "test_batch").unlink()
    monkeypatch.setattr(CIFAR10DataModule.dataset_cls, "tgz_md5", "0" * 32)
    with pytest.raises(DataIntegrityError) as err:
        CIFAR10DataModule(str(data_dir), download=True).prepare_data()
    assert str(archive) in str(err.value) and "0" * 32 in str(err.value) and archive.exists()


# ====================================================================== arguments & Lightning
@pytest.mark.parametrize("cls", [FashionMNISTDataModule, CIFAR10DataModule, CIFAR100DataModule, TolstoiDataModule])
def test_defaults_and_argument_validation(cls):
    dm = cls()
    assert dm.batch_size == (50 if cls is TolstoiDataModule else 128)
    assert dm.seed == 42 and dm.num_workers == 0 and dm.download is True and dm.data_dir == "./data"
    for kwargs in ({"batch_size": 0}, {"batch_size": 2.5}, {"num_workers": -1}, {"seed": "x"}, {"data_dir": ""}):
        with pytest.raises(ValueError):
            cls(**kwargs)
    with pytest.raises(RuntimeError, match="setup"):
        cls().train_dataloader()
    assert cls.__doc__ and "Args:" in cls.__doc__


def test_batch_larger_than_training_set(tmp_path):
    write_fake_fashion_mnist(tmp_path, n_train=10, n_test=5)
    with pytest.raises(ValueError, match="larger than the training set"):
        FashionMNISTDataModule(str(tmp_path), batch_size=11, download=False).setup()


def test_jsonargparse_signatures():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(CIFAR10DataModule, "data")
    cfg = parser.parse_args(["--data.batch_size=64", "--data.pixel_range=255", "--data.download=false"])
    dm = CIFAR10DataModule(**cfg.data.as_dict())
    assert dm.batch_size == 64 and dm.pixel_range == 255.0 and dm.download is False
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(TolstoiDataModule, "data")
    assert parser.parse_args(["--data.seq_len=20"]).data.seq_len == 20


def test_lightning_validates_on_train_eval_and_test(tmp_path):
    import pytorch_lightning as pl

    write_fake_fashion_mnist(tmp_path, n_train=64, n_test=32)
    seen = []

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(28 * 28, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            seen.append((dataloader_idx, len(batch[0])))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = FashionMNISTDataModule(str(tmp_path), batch_size=16, download=False)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(Tiny(), datamodule=dm)
    assert sorted(set(i for i, _ in seen)) == [0, 1]
    assert sum(n for i, n in seen if i == 0) == 32 and sum(n for i, n in seen if i == 1) == 32


def test_lightning_runs_tolstoi_streams(tolstoi):
    import pytorch_lightning as pl

    seen = []

    class CharModel(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(83, 8)
            self.out = torch.nn.Linear(8, 83)

        def training_step(self, batch, batch_idx):
            x, y = batch
            assert x.shape == (50, 50)
            return torch.nn.functional.cross_entropy(self.out(self.emb(x)).flatten(0, 1), y.flatten())

        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            seen.append((dataloader_idx, batch_idx, tuple(batch[0].shape)))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = TolstoiDataModule(tolstoi.data_dir, download=False)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=3,
        limit_val_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tolstoi.data_dir),
    )
    trainer.fit(CharModel(), datamodule=dm)
    assert seen == [(0, 0, (50, 50)), (0, 1, (50, 50)), (1, 0, (50, 50)), (1, 1, (50, 50))]


# ====================================================================== transforms
def test_per_image_standardization_matches_tf_formula():
    torch.manual_seed(0)
    x = torch.rand(3, 32, 32)
    out = PerImageStandardization()(x)
    ref = (x - x.mean()) / max(float(x.std(correction=0)), 1 / math.sqrt(3072))
    torch.testing.assert_close(out, ref)
    const = torch.full((3, 32, 32), 0.7)
    # a constant image maps to zeros (up to the float32 rounding of its mean), not to inf/nan
    torch.testing.assert_close(PerImageStandardization()(const), torch.zeros(3, 32, 32), atol=1e-4, rtol=0)
    tiny = 0.5 + 1e-4 * torch.randn(3, 32, 32)  # std below the floor: divided by 1/sqrt(3072)
    torch.testing.assert_close(PerImageStandardization()(tiny), (tiny - tiny.mean()) * math.sqrt(3072))


def test_tf_brightness_is_additive_and_contrast_per_channel():
    torch.manual_seed(1)
    x = torch.rand(3, 8, 8)
    for _ in range(20):
        d = TFRandomBrightness(63 / 255)(x) - x
        assert torch.allclose(d, d.flatten()[0].expand_as(d), atol=1e-6) and abs(float(d[0, 0, 0])) <= 63 / 255
    y = TFRandomContrast(0.2, 1.8)(x)
    torch.testing.assert_close(y.mean(dim=(1, 2)), x.mean(dim=(1, 2)))
    f = (y - y.mean(dim=(1, 2), keepdim=True)) / (x - x.mean(dim=(1, 2), keepdim=True))
    assert 0.2 <= float(f.mean()) < 1.8 and torch.allclose(f, f.mean().expand_as(f), atol=1e-4)


def _tf_rgb_to_hsv(r, g, b):
    """Python port of TensorFlow's AdjustSaturation kernel helpers (adjust_saturation_op.cc)."""
    vv = max(r, g, b)
    rng = vv - min(r, g, b)
    s = rng / vv if vv > 0 else 0.0
    if rng <= 0:
        h = 0.0
    else:
        norm = 1.0 / (6.0 * rng)
        if r == vv:
            h = norm * (g - b)
        elif g == vv:
            h = norm * (b - r) + 2.0 / 6.0
        else:
            h = norm * (r - g) + 4.0 / 6.0
    if h < 0:
        h += 1
    return h, s, vv


def _tf_hsv_to_rgb(h, s, v):
    c = s * v
    m = v - c
    dh = h * 6
    fmodu = dh
    while fmodu <= 0:
        fmodu += 2.0
    while fmodu >= 2.0:
        fmodu -= 2.0
    x = c * (1 - abs(fmodu - 1))
    rgb = {0: (c, x, 0), 1: (x, c, 0), 2: (0, c, x), 3: (0, x, c), 4: (x, 0, c), 5: (c, 0, x)}.get(int(dh), (0, 0, 0))
    return tuple(ch + m for ch in rgb)


@pytest.mark.parametrize("factor", [0.0, 0.3, 1.0, 1.4, 3.0])
def test_saturation_matches_hsv_reference(factor):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, size=(3, 4, 5)).astype(np.float64)
    x[:, 0, 0] = 0.4  # a grey pixel
    out = adjust_saturation_hsv(torch.from_numpy(x), factor).numpy()
    for i in range(4):
        for j in range(5):
            h, s, v = colorsys.rgb_to_hsv(*x[:, i, j])
            ref = colorsys.hsv_to_rgb(h, min(max(s * factor, 0.0), 1.0), v)
            np.testing.assert_allclose(out[:, i, j], ref, atol=1e-9)
    # outside [0, 1] (after the unclipped brightness shift) compare with TF's own kernel logic
    x = rng.uniform(-0.3, 1.3, size=(3, 6, 6))
    x[:, 0, 0] = [-0.2, -0.1, -0.25]  # V <= 0: TF makes the pixel grey at V
    out = adjust_saturation_hsv(torch.from_numpy(x), factor).numpy()
    for i in range(6):
        for j in range(6):
            h, s, v = _tf_rgb_to_hsv(*x[:, i, j])
            ref = _tf_hsv_to_rgb(h, min(max(s * factor, 0.0), 1.0), v)
            np.testing.assert_allclose(out[:, i, j], ref, atol=1e-9)


def _reference_cifar_train(img: np.ndarray, pixel_range: float, seed: int) -> np.ndarray:
    """DeepOBS's CIFAR training augmentation written out in NumPy (float64), in its order:
    pad 2 -> crop 32 -> h-flip -> brightness -> saturation (HSV, colorsys) -> contrast ->
    per-image standardisation. The random numbers are drawn from torch's generator seeded
    with ``seed`` in the order the pipeline consumes them (crop offsets, flip, then one
    uniform each for brightness, saturation, contrast)."""
    gen = torch.Generator().manual_seed(seed)
    top = int(torch.randint(0, 2 * 2 + 1, size=(1,), generator=gen))
    left = int(torch.randint(0, 2 * 2 + 1, size=(1,), generator=gen))
    flip = float(torch.rand(1, generator=gen)) < 0.5
    u_brightness, u_saturation, u_contrast = (float(torch.rand((), generator=gen)) for _ in range(3))
    x = img.astype(np.float64).transpose(2, 0, 1) * (pixel_range / 255.0)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, top : top + 32, left : left + 32]
    if flip:
        x = x[:, :, ::-1]
    x = x + (-63 / 255 + 2 * 63 / 255 * u_brightness)  # delta in the image's own units
    factor = 0.5 + u_saturation
    out = np.empty_like(x)
    for i in range(32):
        for j in range(32):
            r, g, b = x[:, i, j]
            v = max(r, g, b)
            if v <= 0:
                out[:, i, j] = v  # TF: no saturation for V <= 0, grey at V
                continue
            h, s_, v = colorsys.rgb_to_hsv(r, g, b)
            out[:, i, j] = colorsys.hsv_to_rgb(h, min(max(s_ * factor, 0.0), 1.0), v)
    x = out
    contrast = 0.2 + 1.6 * u_contrast
    mean = x.mean(axis=(1, 2), keepdims=True)
    x = (x - mean) * contrast + mean
    return (x - x.mean()) / max(x.std(), 1 / math.sqrt(x.size))


@pytest.mark.parametrize("pixel_range", [1.0, 255.0])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cifar_train_transform_equals_a_reference_composition(pixel_range, seed):
    img = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    torch.manual_seed(seed)
    out = cifar_train_transform(pixel_range)(torch.from_numpy(img))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), _reference_cifar_train(img, pixel_range, seed), rtol=0, atol=2e-4)


def test_cifar_brightness_delta_is_63_over_255_in_the_images_units():
    """With pixel_range 255 (DeepOBS-TF's raw scale) the delta stays ≤ 63/255, i.e. a quarter
    grey level: it is not rescaled with the pixels."""
    brightness = TFRandomBrightness(lightning_msvag.datamodules.transforms.CIFAR_BRIGHTNESS_MAX_DELTA)
    torch.manual_seed(0)
    deltas = torch.tensor([float(brightness(torch.zeros(1))) for _ in range(2000)])
    assert float(deltas.abs().max()) <= 63 / 255 and float(deltas.abs().max()) > 0.95 * 63 / 255
    assert float(deltas.min()) < 0 < float(deltas.max())


def test_cifar_eval_transform_is_standardisation_only():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for pixel_range in (1.0, 255.0):
        x = img.permute(2, 0, 1).double()
        expected = (x - x.mean()) / max(float(x.std(unbiased=False)), 1 / math.sqrt(3072))
        torch.testing.assert_close(cifar_eval_transform(pixel_range)(img).double(), expected, atol=1e-5, rtol=0)
    assert lightning_msvag.datamodules.transforms.CIFAR_BRIGHTNESS_MAX_DELTA == 63 / 255

@pytest.mark.parametrize("cls,train,test,shape,classes", [
    (FashionMNISTDataModule, 60_000, 10_000, (1, 28, 28), 10),
    (CIFAR10DataModule, 50_000, 10_000, (3, 32, 32), 10),
    (CIFAR100DataModule, 50_000, 10_000, (3, 32, 32), 100),
])
def test_synthetic_data_has_the_real_shapes_and_sizes_and_reads_no_file(tmp_path, cls, train, test, shape, classes):
    """synthetic=True: no file read or downloaded (an empty data_dir, download off), the sizes,
    shapes and classes of the real set, through the real transforms and loaders; said once."""
    dm = cls(data_dir=str(tmp_path / "none"), batch_size=16, download=False, synthetic=True)
    dm.prepare_data()
    with pytest.warns(UserWarning, match=r"synthetic=True\): random images and labels .* not for science"):
        dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.test_dataset), len(dm.train_eval_dataset)) == (train, test, test)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, *shape) and x.dtype == torch.float32 and 0 <= int(y.min()) and int(y.max()) < classes
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="synthetic must be True or False"):
        cls(data_dir=str(tmp_path), synthetic="yes")
