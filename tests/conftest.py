import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu") if os.environ.get("MLJAX_TEST_GPU") is None else None
sys.path.insert(0, str(Path(__file__).parent))
