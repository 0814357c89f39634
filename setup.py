"""Package discovery for lightning-msvag; the metadata lives in pyproject.toml.

Every package below ``lightning_msvag/``, ``models/`` and ``datamodules/`` is found here, none is
listed by hand (a list kept by hand once missed ``lightning_msvag.experiments.benchmark``). The
problem packages ``models/`` and ``datamodules/`` and the YAML ``configs/`` keep their folders at
the top of the repository but install as subpackages of ``lightning_msvag``: the wheel claims no
top-level import name but ``lightning_msvag`` (a user's own ``models`` package stays theirs).
"""

from setuptools import find_namespace_packages, find_packages, setup

#: import name -> folder of the repository
MAPPED = {
    "lightning_msvag.models": "models",
    "lightning_msvag.datamodules": "datamodules",
    "lightning_msvag.configs": "configs",  # YAML only: folders without __init__.py
}

packages = find_packages(include=["lightning_msvag", "lightning_msvag.*"])
for name, folder in MAPPED.items():
    finder = find_namespace_packages if name.endswith(".configs") else find_packages
    packages += [name] + [f"{name}.{sub}" for sub in finder(folder, exclude=["*__pycache__*"])]

setup(packages=packages, package_dir=MAPPED)
