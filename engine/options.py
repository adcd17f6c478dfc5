"""Decoding options: one set of names and defaults from HTTP down to the beam loop."""

from __future__ import annotations

import dataclasses
import math

from engine.errors import InvalidRequestError

MAX_BEAM_SIZE = 16
MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy search in all but name (and float64 overflows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodingOptions:
    """How to decode one request.

    Attributes:
        beam_size: beams per sentence; 1 = greedy search (exactly equal to beam search with one beam).
        length_penalty: alpha of the GNMT length penalty lp(len) = ((5 + len) / 6) ** alpha (Wu et al. 2016,
            eq. 14), by which beam hypotheses' summed log-probs are divided for ranking; 0 disables it.
        n_best: hypotheses returned per sentence, best first; <= beam_size.
        max_length: hard cap on generated tokens (eos included) per sentence.
        max_length_a, max_length_b: length bound from the source, a * src_len + b tokens (src_len counts the
            source's eos); the effective limit is the smaller of this, ``max_length`` and the model's positions.
        min_length: eos is forbidden before this many tokens have been generated.
        no_repeat_ngram_size: no n-gram of this many tokens appears twice in an output; 0 disables.
        repetition_penalty: log-probs of tokens the hypothesis already holds are multiplied by this, then
            renormalized (CTRL's penalty on log-probs); 1 disables, > 1 discourages repeats.
        sampling_topk: beam_size 1 only: sample among the k most likely tokens; 1 = greedy (no sampling),
            0 = the whole vocabulary.
        sampling_topp: nucleus sampling mass in (0, 1]; 1 disables.
        sampling_temperature: log-probs are divided by this before sampling; > 0.
        seed: sampling seed; the same seed gives the same output. None: every sentence draws fresh entropy.
        return_attention: per output token, the cross-attention weights over the source tokens of the last
            decoder layer, averaged over its heads.
        return_scores: False: a greedy hypothesis's score may be NaN, which lets a step of greedy sentences that
            need no other rule skip the log-softmax over the vocabulary (engine/core.py); beam search always
            scores (its ranking is the score). CTranslate2's ``return_scores``, whose default is False there.

    Raises:
        InvalidRequestError: on construction, when a value is out of range (message names value and range).
    """

    beam_size: int = 4
    length_penalty: float = 0.6
    n_best: int = 1
    max_length: int = 256
    max_length_a: float = 2.0
    max_length_b: int = 10
    min_length: int = 0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    sampling_topk: int = 1
    sampling_topp: float = 1.0
    sampling_temperature: float = 1.0
    seed: int | None = None
    return_attention: bool = False
    return_scores: bool = True

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidRequestError(message)

        check(1 <= self.beam_size <= MAX_BEAM_SIZE, f"beam_size must be in [1, {MAX_BEAM_SIZE}], got {self.beam_size}")
        check(math.isfinite(self.length_penalty) and 0.0 <= self.length_penalty <= 10.0,
              f"length_penalty must be in [0, 10], got {self.length_penalty}")
        check(1 <= self.n_best <= self.beam_size, f"n_best must be in [1, beam_size={self.beam_size}], "
                                                  f"got {self.n_best}")
        check(self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}")
        check(math.isfinite(self.max_length_a) and self.max_length_a >= 0,
              f"max_length_a must be >= 0, got {self.max_length_a}")
        check(self.max_length_b >= 1, f"max_length_b must be >= 1, got {self.max_length_b}")
        check(0 <= self.min_length <= self.max_length,
              f"min_length must be in [0, max_length={self.max_length}], got {self.min_length}")
        check(0 <= self.no_repeat_ngram_size <= 32, f"no_repeat_ngram_size must be in [0, 32], got "
                                                    f"{self.no_repeat_ngram_size}")
        check(math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
              f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        check(self.sampling_topk >= 0, f"sampling_topk must be >= 0, got {self.sampling_topk}")
        check(math.isfinite(self.sampling_topp) and 0 < self.sampling_topp <= 1,
              f"sampling_topp must be in (0, 1], got {self.sampling_topp}")
        check(math.isfinite(self.sampling_temperature) and MIN_TEMPERATURE <= self.sampling_temperature <= 100,
              f"sampling_temperature must be in [{MIN_TEMPERATURE}, 100], got {self.sampling_temperature}")
        check(self.seed is None or 0 <= self.seed < 2 ** 63, f"seed must be in [0, 2**63), got {self.seed}")
        check(self.beam_size == 1 or not self.sampling,
              f"sampling (sampling_topk={self.sampling_topk}, sampling_topp={self.sampling_topp}) needs beam_size "
              f"1, got beam_size {self.beam_size}")

    @property
    def sampling(self) -> bool:
        """True when tokens are drawn at random instead of taken greedily."""
        return self.sampling_topk != 1 or self.sampling_topp < 1.0

    def length_limit(self, src_len: int, max_positions: int) -> int:
        """Generated-token limit for a source of ``src_len`` tokens: min(max_length, a*src_len+b, positions-1),
        raised to min_length when that is larger (an explicit min_length wins over the source-length bound)."""
        bound = max(min(self.max_length, int(self.max_length_a * src_len) + self.max_length_b), self.min_length)
        return max(1, min(bound, max_positions - 1))


def check_target_lengths(options: DecodingOptions, max_positions: int, prefix_tokens: int = 0,
                         prefix_name: str = "target_prefix") -> None:
    """Checks what a model of ``max_positions`` positions can generate against the options and a forced target
    prefix of ``prefix_tokens`` tokens: the prefix must fit in ``max_length`` and leave a position for eos, and
    ``min_length`` must be reachable (a model generates at most max_positions - 1 tokens: the decoder start takes
    a position). Longer ``max_length`` values are capped (DecodingOptions.length_limit), as generate() does.
    ``prefix_name`` names the prefix in the message (e.g. "target_prefix[2]").

    Raises:
        InvalidRequestError: the prefix is too long or min_length cannot be met (HTTP 422).
    """
    most = max_positions - 1
    if prefix_tokens > min(options.max_length, most - 1):
        bound = (f"max_length={options.max_length}" if options.max_length < most - 1
                 else f"limit {most - 1} of the model's positions")
        raise InvalidRequestError(f"{prefix_name} has {prefix_tokens} tokens > {bound}")
    if options.min_length > most:
        raise InvalidRequestError(f"min_length={options.min_length} > {most}, the most tokens this model generates")
