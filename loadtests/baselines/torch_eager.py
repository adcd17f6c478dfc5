"""PyTorch-eager baseline: the project's own nn.Module with its KV cache, behind the engine's search code.

The same engine core and search (engine/core.py, engine/search.py) drive it, so the comparison with the ONNX engine isolates
the runtime: eager PyTorch ops versus ONNX Runtime sessions. On a GPU the cache stays there as torch tensors
(:class:`TorchOps`), as the engine's stays in OrtValues, so neither pays host copies the other does not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.runtime import EngineConfig, cross_slots
from engine.state_ops import resized
from engine.translator import Translator
from export.onnx_export import load_checkpoint
from nmt.model import Transformer


class TorchOps:
    """engine/state_ops.py's interface over torch tensors on one device; exact-size buffers (``in_place`` False),
    as the model's step returns new caches anyway."""

    in_place = False

    @staticmethod
    def view(x: torch.Tensor, rows: int) -> torch.Tensor:
        return x[:rows]

    @staticmethod
    def resize(xs: list[torch.Tensor], used: int, rows: int, capacity: int, unread_tail: bool = False,
               cached: int | None = None, unread_rows: bool = False) -> list[torch.Tensor]:
        """As NumpyOps.resize; always zeroed and copied whole (the eager model masks its cache with an additive
        bias; ``unread_tail``, ``cached`` and ``unread_rows`` are accepted and ignored)."""
        return resized(xs, used, rows, capacity, lambda x, shape: x.new_zeros(shape))

    @staticmethod
    def move_rows(xs: list[torch.Tensor], dst: np.ndarray, src: np.ndarray, length: int,
                  rows: int, start: list[int] | None = None) -> list[torch.Tensor]:
        if not len(dst) and xs[0].shape[0] == rows:
            return xs
        index = np.arange(rows, dtype=np.int64)
        index[dst] = src
        return TorchOps.take(xs, index)

    @staticmethod
    def write_rows(xs: list[torch.Tensor], start: int, ys: list[torch.Tensor]) -> list[torch.Tensor]:
        return TorchOps.concat_rows([x[:start] for x in xs], ys, xs[0].shape[2])

    @staticmethod
    def shape(x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape)

    @staticmethod
    def to_numpy(xs: list[torch.Tensor]) -> list[np.ndarray]:
        return [x.cpu().numpy() for x in xs]

    @staticmethod
    def empty(like: torch.Tensor, rows: int | None = None, capacity: int = 0) -> torch.Tensor:
        return like.new_zeros((like.shape[0] if rows is None else rows, like.shape[1], capacity, like.shape[3]))

    @staticmethod
    def take(xs: list[torch.Tensor], rows: np.ndarray, start: int = 0, end: int | None = None) -> list[torch.Tensor]:
        index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(xs[0].device)
        return [x[:, :, start:end].index_select(0, index) for x in xs]

    @staticmethod
    def concat_rows(xs: list[torch.Tensor], ys: list[torch.Tensor], length: int) -> list[torch.Tensor]:
        pad = torch.nn.functional.pad
        return [torch.cat([pad(x, (0, 0, 0, length - x.shape[2])), pad(y, (0, 0, 0, length - y.shape[2]))])
                for x, y in zip(xs, ys)]


class TorchStepModel:
    """OnnxModel's interface (encode, step, ops) over an eval-mode Transformer on ``device`` ("cpu" or "cuda").

    Token ids, masks, log-probs and attention cross as numpy; the state stays torch tensors on the device.
    """

    ops = TorchOps()
    logits_on_request = True  # step(log_softmax=False), as OnnxModel

    def __init__(self, model: Transformer, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.provider = f"torch-eager-{self.device.type}"

    def _in(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    @torch.inference_mode()
    def encode(self, src_ids: np.ndarray, src_mask: np.ndarray) -> tuple[list, list]:
        """src_ids int64 [batch, src_len], src_mask bool -> cross_k, cross_v: per decoder layer, float32
        [batch, n_heads, src_len, d_head] torch tensors on the device."""
        memory = self.model.encode(self._in(src_ids), self._in(src_mask))
        return self.model.cross_kv(memory)

    @torch.inference_mode()
    def step(self, tokens, self_k, self_v, cross_k, cross_v, src_mask, top_k=None, *, positions, row_sentence=None,
             check_nan=True, log_softmax=True):
        """One decoder step, shapes as OnnxModel.step (format 7); full log-probs (or with ``log_softmax`` False,
        logits) only: ``top_k`` must be None. The caches come back as new tensors (``Transformer.decode_step_cached``
        in plain PyTorch ops)."""
        assert top_k is None, "the PyTorch baseline returns full log-probs"
        slot_rows, row_slot = cross_slots(np.arange(len(tokens)) if row_sentence is None else row_sentence)
        log_probs, new_k, new_v, attention = self.model.decode_step_cached(
            self._in(tokens), self._in(positions), self_k, self_v, cross_k, cross_v, self._in(src_mask),
            self._in(slot_rows), self._in(row_slot), custom_op=False, log_softmax=log_softmax)
        return log_probs.cpu().numpy(), new_k, new_v, attention.cpu().numpy()


def torch_translator(artifact_dir: str | Path, checkpoint: str | Path, threads: int, device: str = "cpu",
                     max_batch_tokens: int = EngineConfig().max_batch_tokens) -> Translator:
    """A Translator (tokenizer, engine core and search from ``artifact_dir``) whose model runs in eager PyTorch on
    ``device``, with the engine's batching (``max_batch_tokens`` padded source tokens decoding together).

    ``threads`` sets torch's intra-op threads for the whole process.
    """
    torch.set_num_threads(threads)
    return Translator(artifact_dir, EngineConfig(device="cpu", intra_op_threads=threads,
                                                 max_batch_tokens=max_batch_tokens),
                      model=TorchStepModel(load_checkpoint(checkpoint), device))
