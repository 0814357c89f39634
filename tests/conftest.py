import sys
from pathlib import Path

# test helpers (numpy_reference, fakes) live beside the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))
