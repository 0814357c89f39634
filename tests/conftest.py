"""pytest configuration: ``tests`` is a package, so pytest puts the repository root on
``sys.path`` and the helpers import as ``tests.helpers.*``.

Shared here, defined once:

- the ``cuda`` marker: ``@pytest.mark.cuda`` skips a test where no CUDA device exists;
- the ``tolstoi_dir`` fixture: a Tolstoi data folder per test module (the packaged War and
  Peace text, id cache built once).
"""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped where there is none)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tolstoi_dir(tmp_path_factory):
    """A Tolstoi data folder for the module: the packaged text, its id cache built once."""
    from lightning_msvag.datamodules import TolstoiDataModule

    root = tmp_path_factory.mktemp("tolstoi")
    TolstoiDataModule(str(root), download=False).prepare_data()
    return root
