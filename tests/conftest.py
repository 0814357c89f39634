"""pytest configuration: ``tests`` is a package, so pytest puts the repository root on
``sys.path`` and the helpers import as ``tests.helpers.*``."""
