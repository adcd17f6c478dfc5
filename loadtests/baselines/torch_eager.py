"""PyTorch-eager baseline: the project's own nn.Module with its KV cache, behind the engine's search code.

The same batched greedy/beam search (engine/search.py) drives it, so the comparison with the ONNX engine isolates
the runtime: eager PyTorch ops versus ONNX Runtime sessions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.runtime import EngineConfig
from engine.translator import Translator
from export.onnx_export import load_checkpoint
from nmt.model import Transformer


class TorchStepModel:
    """OnnxModel's interface (encode, step; numpy in and out) over an eval-mode Transformer on the CPU."""

    provider = "torch-eager-cpu"

    def __init__(self, model: Transformer) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """src_ids int64 [batch, src_len], src_mask bool -> cross_k, cross_v: per decoder layer, float32
        [batch, n_heads, src_len, d_head]."""
        memory = self.model.encode(torch.from_numpy(src_ids), torch.from_numpy(src_mask))
        cross_k, cross_v = self.model.cross_kv(memory)
        return [k.numpy() for k in cross_k], [v.numpy() for v in cross_v]

    @torch.inference_mode()
    def step(self, tokens, self_k, self_v, cross_k, cross_v, src_mask):
        """One decoder step, shapes as OnnxModel.step."""
        as_torch = lambda arrays: [torch.from_numpy(a) for a in arrays]  # noqa: E731 (zero-copy views)
        log_probs, new_k, new_v, attention = self.model.decode_step(
            torch.from_numpy(tokens), as_torch(self_k), as_torch(self_v), as_torch(cross_k), as_torch(cross_v),
            torch.from_numpy(src_mask))
        return log_probs.numpy(), [k.numpy() for k in new_k], [v.numpy() for v in new_v], attention.numpy()


def torch_translator(artifact_dir: str | Path, checkpoint: str | Path, threads: int) -> Translator:
    """A Translator (tokenizer and search from ``artifact_dir``) whose model runs in eager PyTorch.

    ``threads`` sets torch's intra-op threads for the whole process.
    """
    torch.set_num_threads(threads)
    return Translator(artifact_dir, EngineConfig(device="cpu", intra_op_threads=threads),
                      model=TorchStepModel(load_checkpoint(checkpoint)))
