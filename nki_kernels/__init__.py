"""NKI (AWS Trainium/Inferentia) kernels, installed as ``spdkernels.nki_kernels``.

The Neuron packages come from the Neuron package index, never from PyPI (PyPI's ``nki`` and
``neuronx-cc`` are placeholders that raise ``ImportError("WRONG PACKAGE")``), so the import is guarded
and the package never depends on them. No op has an NKI implementation yet: the registry reports the
backend as unavailable here with the reason below.
"""

from __future__ import annotations

import functools
from typing import Tuple


@functools.cache
def nki_available() -> Tuple[bool, str]:
    try:
        import nki  # noqa: F401
        import nki.language  # noqa: F401
    except Exception as e:  # ImportError, including PyPI's "WRONG PACKAGE" placeholder
        return False, f"nki not importable ({type(e).__name__}: {e})"
    return True, ""
