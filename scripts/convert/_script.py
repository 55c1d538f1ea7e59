"""Lets a converter run as a plain script from a source tree: `python scripts/convert/smolvlm2.py ...`.

The converters import each other as `vlmcli.convert.*` (the name they are installed under). Run as
a script without vlmcli installed, that package does not exist: map it to this folder.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def make_vlmcli_convert_importable() -> None:
    here = Path(__file__).resolve().parent
    root = str(here.parents[1])  # the source tree, for `import vlmcli`
    if root not in sys.path:
        sys.path.insert(0, root)
    if importlib.util.find_spec("vlmcli.convert") is None:
        spec = importlib.util.spec_from_file_location(
            "vlmcli.convert", here / "__init__.py", submodule_search_locations=[str(here)]
        )
        assert spec is not None and spec.loader is not None
        sys.modules["vlmcli.convert"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["vlmcli.convert"])
