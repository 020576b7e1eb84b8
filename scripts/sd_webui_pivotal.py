"""Webui entry file: makes ``lib/pivotal`` importable and hands off; nothing else lives here.

The webui puts the extension root on ``sys.path`` only while this file is being imported, so a
later lazy ``import pivotal.x`` would fail; ``lib/`` is therefore added for good. ``pivotal`` is
the only name it exposes (``lib`` itself is not a package).
"""

import os
import sys

_lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
if _lib not in sys.path:
    sys.path.append(_lib)

from pivotal.webui.bundle_script import PivotalBundleEmbeddings  # noqa: E402,F401  (found by the webui's script loader)
from pivotal.webui.entry import register  # noqa: E402  (needs lib/ on sys.path first)

register()
