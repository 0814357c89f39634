"""Shared test helpers, imported as ``tests.helpers.<module>``.

- ``numpy_reference``: the independent NumPy transcription of docs/algorithm.md §1 (the oracle).
- ``fakes``: small data files in the real on-disk formats (IDX, CIFAR pickles).
- ``boring``: one tiny LightningModule (with dropout) and a shuffled random loader.
- ``resume``: callbacks and runners for the exact-resume and pre-emption tests.
"""
