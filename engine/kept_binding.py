"""An ONNX Runtime IOBinding kept between calls, holding numpy arrays bound by address (engine/runtime.py's decoder
step, engine/top_k.py's TopK and LogSoftmax graphs): binding again what it already holds is skipped, since binding
by address costs about 3 us a tensor, a share of a small step worth keeping. Not thread-safe (an IOBinding is
not): its owners keep one per thread.
"""

from __future__ import annotations

import weakref

import numpy as np
import onnxruntime as ort

# The largest output a kept binding keeps between steps: the logits of 131 rows of an 8000-token vocabulary, or of
# 18 rows of OPUS-MT's 58,101. Its steps gain a bind and an allocation (tens of us, measured at 1-32 rows); a
# larger step takes milliseconds, and the decoder step's kept bindings (several per thread) would hold its memory
# while idle.
KEPT_OUTPUT_BYTES = 4 * 2**20


class KeptBinding:
    """An IOBinding kept between runs, with what it holds bound by address (numpy arrays, C-contiguous: the caller
    keeps them alive through the run); binding again what it already holds is skipped."""

    def __init__(self, binding: ort.IOBinding) -> None:
        self.binding, self._held, self._last, self._outputs = binding, {}, {}, {}

    def bind(self, name: str, array: np.ndarray, output: str | None = None) -> None:
        """``array`` as input ``name`` and, when ``output`` is given, as that output too (written in place)."""
        last = self._last.get(name)
        if last is not None and last() is array:  # the very array of the last step (EngineCore._views)
            return
        held = (array.ctypes.data, array.shape, array.dtype)
        if self._held.get(name) != held:
            self.binding.bind_input(name, "cpu", 0, array.dtype, array.shape, held[0])
            if output is not None:
                self.binding.bind_output(output, "cpu", 0, array.dtype, array.shape, held[0])
            self._held[name] = held
        self._last[name] = weakref.ref(array)  # not a reference: a binding must not keep a replaced buffer alive

    def output(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        """An array of ``shape`` and ``dtype`` bound as output ``name``: the one of the last call while the shape is
        the same (binding an output costs about 3 us), if it is at most KEPT_OUTPUT_BYTES, else a new one each call.
        Valid until the next run writes it again."""
        kept = self._outputs.get(name)
        if kept is not None and kept.shape == shape and kept.dtype == dtype:
            return kept
        array = np.empty(shape, dtype)
        self.binding.bind_output(name, "cpu", 0, array.dtype, shape, array.ctypes.data)
        if array.nbytes <= KEPT_OUTPUT_BYTES:
            self._outputs[name] = array
        else:
            self._outputs.pop(name, None)
        return array
