"""Import Mosaic Streaming's `streaming.base` without `streaming/__init__.py` pulling in torchvision.

Why this exists: `import streaming` runs `streaming/__init__.py`, which imports `streaming.vision`,
which imports torchvision. PyPI's torchvision does not import beside our CPU torch 2.13.0, so we
install mosaicml-streaming 0.13.0 with `--no-deps` and without torchvision (see docs/DATA.md).
megaflow needs only `streaming.base` (MDSWriter, StreamingDataset, Stream, the shard readers), which
does not touch torchvision.

What it does: if torchvision imports, `streaming` is imported normally. Otherwise a bare package
module named `streaming` is registered in `sys.modules` whose `__path__` is the installed package
directory (found with `importlib.util.find_spec`, which does not execute `__init__.py`), so that
`import streaming.base` finds the submodules on disk while `streaming/__init__.py` never runs.

What it does not do: it does not make `streaming.vision`, `streaming.text` or `streaming.multimodal`
usable without torchvision. Every other module of megaflow imports Streaming only through this file.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _import_streaming_base() -> types.ModuleType:
    if "streaming" not in sys.modules:
        try:
            import torchvision  # noqa: F401  (only probing whether the full package can import)

            importlib.import_module("streaming")
        except ImportError:
            spec = importlib.util.find_spec("streaming")
            if spec is None or not spec.submodule_search_locations:
                raise ImportError(
                    "mosaicml-streaming is not installed; install it with "
                    "`pip install --no-deps -r requirements-nodeps.txt` (see docs/DATA.md)"
                ) from None
            package = types.ModuleType("streaming")
            package.__path__ = list(spec.submodule_search_locations)
            package.__file__ = spec.origin
            package.__spec__ = spec
            package.__package__ = "streaming"
            sys.modules["streaming"] = package
    return importlib.import_module("streaming.base")


streaming_base = _import_streaming_base()

from streaming.base import MDSWriter, Stream, StreamingDataset  # noqa: E402
from streaming.base import distributed as streaming_distributed  # noqa: E402
from streaming.base import util as streaming_util  # noqa: E402
from streaming.base.batching import generate_work  # noqa: E402
from streaming.base.constant import SHM_TO_CLEAN, BARRIER_FILELOCK, CACHE_FILELOCK  # noqa: E402
from streaming.base.world import World  # noqa: E402

__all__ = [
    "MDSWriter",
    "Stream",
    "StreamingDataset",
    "World",
    "generate_work",
    "SHM_TO_CLEAN",
    "BARRIER_FILELOCK",
    "CACHE_FILELOCK",
    "streaming_base",
    "streaming_distributed",
    "streaming_util",
]
