"""The translation engine: artifact in, texts in, translations out. No Ray, no HTTP, no torch.

    from engine.translator import Translator
    from engine.options import DecodingOptions
    translator = Translator("artifacts/en-de")
    translator.translate(["The file could not be opened."], DecodingOptions(beam_size=4))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable


from engine import contract, segmentation
from engine.errors import InputTooLongError, InvalidRequestError
from engine.options import DecodingOptions
from engine.runtime import EngineConfig, OnnxModel
from engine.core import CoreStats, EngineCore
from engine.search import Hypothesis
from engine.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Translation:
    """One sentence's result.

    Attributes:
        text: the best translation, detokenized.
        score: its summed natural-log probability (eos included); 0.0 for empty input; NaN from greedy search
            with ``DecodingOptions.return_scores`` False.
        n_best: (text, score) pairs, best first by the length-normalized ranking score; n_best[0] is ``text``.
        n_tokens: generated target tokens of the best hypothesis (eos excluded).
    """

    text: str
    score: float
    n_best: list[tuple[str, float]]
    n_tokens: int


class Translator:
    """Loads an artifact folder (engine/contract.py) and translates batches of texts.

    Attributes:
        provider: the ONNX Runtime execution provider that really runs ("CUDAExecutionProvider" or
            "CPUExecutionProvider").
        max_src_tokens: longest accepted source, in sentencepiece tokens including eos.
        manifest: the artifact's manifest.json as a dict ({} while export is still verifying the artifact).

    Raises:
        FileNotFoundError: the artifact is incomplete.
        ValueError: the artifact was written in another format version, or is one its provider runs wrongly
            (engine/contract.py).
    """

    def __init__(self, artifact_dir: str | Path, config: EngineConfig | None = None, model=None) -> None:
        started = time.perf_counter()
        self.artifact_dir = Path(artifact_dir)
        self.config = config or EngineConfig()
        manifest_path = self.artifact_dir / contract.MANIFEST
        self.manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        model_config = json.loads((self.artifact_dir / contract.CONFIG_FILE).read_text())
        self.bos_id, self.eos_id, self.pad_id = (model_config[k] for k in ("bos_id", "eos_id", "pad_id"))
        self.max_positions = model_config["max_positions"]
        self.max_src_tokens = self.max_positions
        # Decoding defaults shipped with the model (e.g. an imported checkpoint's generation config); requests
        # override them field by field.
        self.default_options = DecodingOptions(**model_config.get("decoding_defaults", {}))
        self.tokenizer = load_tokenizer(self.artifact_dir, model_config)
        # ``model``: anything with OnnxModel's encode/step/provider (the PyTorch-eager benchmark baseline).
        contract.check_format(self.manifest, self.artifact_dir)
        self.model = model if model is not None else OnnxModel(self.artifact_dir, self.config,
                                                               model_config["n_decoder_layers"],
                                                               self.manifest.get("self_attention"))
        self.provider = self.model.provider
        warning = contract.check_provider(self.manifest, self.provider, getattr(self.model, "float16", False),
                                          self.artifact_dir)
        if warning:
            log.warning(warning)
        self.ops = self.model.ops
        self.load_seconds = time.perf_counter() - started

    def tokenize(self, text: str, boundaries: tuple[int, ...] = ()) -> list[int]:
        """Source token ids with eos appended; [] for empty text or text of only whitespace and invisible format
        characters (segmentation.is_blank). ``boundaries``: character offsets where a piece must end when the
        vocabulary allows (the ends of protected spans' masks: engine/tokenizer.py, split_at_boundaries).

        Raises:
            InputTooLongError: more than ``max_src_tokens`` tokens.
            InvalidRequestError: text with a lone surrogate (not valid Unicode: the tokenizer cannot take it).
        """
        if segmentation.is_blank(text):
            return []
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequestError(f"the text is not valid Unicode: a lone surrogate at character {e.start}"
                                      ) from None
        ids = self.tokenizer.encode_source(text, boundaries) + [self.eos_id]
        if len(ids) > self.max_src_tokens:
            raise InputTooLongError(len(ids), self.max_src_tokens)
        return ids

    def unknown_pieces(self, text: str) -> list[str]:
        """Source substrings that the vocabulary maps to unk, in order (for :meth:`detokenize`)."""
        return self.tokenizer.unknown_source_pieces(text)

    def detokenize(self, ids: list[int], unknowns: list[str] | None = None) -> str:
        """Token ids -> text. With ``unknowns`` (from :meth:`unknown_pieces` of the source), the k-th unk of the
        output becomes the k-th unknown source substring, copied as is; without, unk shows as the tokenizer's
        unk rendering."""
        return self.tokenizer.decode_target(ids, unknowns)

    def translate(self, texts: list[str], options: DecodingOptions | None = None,
                  stats: CoreStats | None = None) -> list[Translation]:
        """Translates texts (one sentence each) as one job (:meth:`translate_ids`). Empty or whitespace-only texts
        give "" without running the model.

        Raises:
            InputTooLongError: a text is longer than the model accepts (checked before any decoding).
        """
        options = options or DecodingOptions()
        src = [self.tokenize(t) for t in texts]
        hypotheses = self.translate_ids(src, options, stats)
        results = []
        for ids, hyps in zip(src, hypotheses):
            if not ids:
                results.append(Translation("", 0.0, [("", 0.0)], 0))
                continue
            n_best = [(self.detokenize(h.tokens), h.score) for h in hyps]
            results.append(Translation(n_best[0][0], hyps[0].score, n_best, len(hyps[0].tokens)))
        return results

    def new_core(self, policy: str | None = None) -> EngineCore:
        """A step-able engine core (engine/core.py) over this translator's model, with the config's scheduling
        policy and budgets (``policy`` overrides the config's)."""
        return EngineCore(self.model, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id,
                          max_positions=self.max_positions, policy=policy or self.config.scheduling,
                          max_batch_rows=self.config.max_batch_rows, max_batch_tokens=self.config.max_batch_tokens,
                          max_batches=self.config.max_batches)

    def translate_ids(self, src: list[list[int]], options: DecodingOptions, stats: CoreStats | None = None,
                      is_cancelled: Callable[[int], bool] | None = None,
                      target_prefixes: list[list[int]] | None = None,
                      policy: str = "refill") -> list[list[Hypothesis]]:
        """Decodes token-id sources (each ending in eos; [] = empty input, returns [] without decoding) through an
        engine core of their own. Returns per sentence its n_best hypotheses, in input order.

        Sentences are submitted shortest first, so that the sentences decoding together have similar lengths.
        ``policy`` is the core's scheduling (engine/core.py). "refill" by default: one caller's list is one job,
        whose time is that of its last sentence, so the continuous policy's latency goals buy it nothing, and its
        early joins cost throughput (joiners longer than the running sentences widen every step, and two batches
        halve the rows of a step); "refill" decodes the list in static batches whose last few sentences decode in
        the next batch's steps instead of in steps of 1-4 rows of their own (docs/performance.md has the
        measurements of each). The service decodes with the config's policy (:meth:`new_core`).
        ``is_cancelled(i)`` (i indexes ``src``) is polled every step; a cancelled sentence leaves and returns [].
        ``target_prefixes[i]``: target token ids forced at the start of sentence i's output (kept in the output).
        ``stats`` (if given) receives the core's counters.

        Raises:
            InputTooLongError: a source longer than ``max_src_tokens`` (checked before any decoding; the
                positions past the model's table do not exist).
            EngineError: a sentence failed (e.g. NumericalError).
            ValueError: an unknown policy.
        """
        longest = max((len(ids) for ids in src), default=0)
        if longest > self.max_src_tokens:
            raise InputTooLongError(longest, self.max_src_tokens)
        core = self.new_core(policy)
        index_of = {}
        for i in sorted(range(len(src)), key=lambda i: len(src[i])):
            prefix = target_prefixes[i] if target_prefixes else None
            index_of[core.submit(src[i], options, target_prefix=prefix)] = i
        results: list[list[Hypothesis]] = [[] for _ in src]
        while core.has_work:
            if is_cancelled is not None:
                for handle, i in index_of.items():
                    if is_cancelled(i):
                        core.abort(handle)
            for done in core.step():
                if done.error is not None:
                    raise done.error
                results[index_of[done.handle]] = done.hypotheses
        if stats is not None:
            for field in dataclasses.fields(CoreStats):
                setattr(stats, field.name, getattr(stats, field.name) + getattr(core.stats, field.name))
        return results

    def warmup(self, lengths: tuple[int, ...] = (4, 16, 64)) -> float:
        """Runs one greedy and one beam decode per source length, and the sentence splitter once
        (segmentation.warmup), so first requests don't pay for lazy init.

        Returns the warm-up time in seconds.
        """
        started = time.perf_counter()
        segmentation.warmup()
        for n in lengths:
            ids = [[4 + (i % 50) for i in range(min(n, self.max_src_tokens) - 1)] + [self.eos_id]]
            for beam_size in (1, 4):
                self.translate_ids(ids, DecodingOptions(beam_size=beam_size, max_length=8))
        return time.perf_counter() - started
