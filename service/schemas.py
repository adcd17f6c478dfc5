"""HTTP request/response models (pydantic). Decoding defaults come from engine.options.DecodingOptions."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import InvalidRequestError
from engine.options import MAX_BEAM_SIZE, MIN_TEMPERATURE, DecodingOptions

_DEFAULTS = DecodingOptions()


class TranslateRequest(BaseModel):
    """POST /translate body. ``text`` is one text or a list of texts; each is translated as one sentence."""

    # allow_inf_nan=False: NaN passes no range check of its own, so without it a NaN option was refused with a
    # misleading "less than or equal to" message.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, json_schema_extra={"examples": [
        {"text": ["The file could not be opened.", "Click the button to save the document."], "beam_size": 4}]})

    text: str | list[str] = Field(description="one text or a list of texts (limits in GET /health)")
    model: str | None = Field(None, description="model id; default: the deployment's model")
    beam_size: int = Field(_DEFAULTS.beam_size, ge=1, le=MAX_BEAM_SIZE, description="1 = greedy search")
    length_penalty: float = Field(_DEFAULTS.length_penalty, ge=0.0, le=10.0,
                                  description="GNMT alpha: ranking score = logprob / ((5 + len) / 6) ** alpha")
    n_best: int = Field(_DEFAULTS.n_best, ge=1, le=MAX_BEAM_SIZE, description="hypotheses per text, <= beam_size")
    max_length: int = Field(_DEFAULTS.max_length, ge=1, le=4096,
                            description="max generated tokens; also bounded by max_length_a * src_len + "
                                        "max_length_b and the model")
    max_length_a: float = Field(_DEFAULTS.max_length_a, ge=0, le=100, description="bound a * src_len + b")
    max_length_b: int = Field(_DEFAULTS.max_length_b, ge=1, le=4096)
    min_length: int = Field(_DEFAULTS.min_length, ge=0, le=4096, description="min generated tokens before eos")
    no_repeat_ngram_size: int = Field(_DEFAULTS.no_repeat_ngram_size, ge=0, le=32,
                                      description="no n-gram of this size repeats in an output; 0 disables")
    repetition_penalty: float = Field(_DEFAULTS.repetition_penalty, gt=0, le=10,
                                      description="> 1 lowers the log-probs of tokens already generated; 1 disables")
    sampling_topk: int = Field(_DEFAULTS.sampling_topk, ge=0, le=100_000,
                               description="beam_size 1: sample among the k best tokens; 1 = greedy, 0 = all")
    sampling_topp: float = Field(_DEFAULTS.sampling_topp, gt=0, le=1, description="nucleus mass; 1 disables")
    sampling_temperature: float = Field(_DEFAULTS.sampling_temperature, ge=MIN_TEMPERATURE, le=100)
    seed: int | None = Field(_DEFAULTS.seed, ge=0, lt=2 ** 63, description="sampling seed: same seed, same output")
    target_prefix: str | list[str | None] | None = Field(
        None, description="forced start of the translation: one string for every text, or one per text (null = "
                          "free); applies to the first sentence of a text")
    split_sentences: bool = Field(True, description="split each text into sentences, translate them in one batch "
                                                    "and join them back with the original whitespace")
    replace_unknowns: bool = Field(True, description="copy source characters the vocabulary lacks (emoji, rare "
                                                     "scripts) into the output instead of the unk token")
    return_scores: bool = Field(False, description="include summed log-prob scores and n_best hypotheses")
    stream: bool = Field(False, description="answer newline-delimited JSON records (application/x-ndjson): each "
                                            "sentence as soon as it and those before it are translated, then each "
                                            "text's whole translation, then a done record (StreamRecord)")
    format: Literal["text", "html", "xml"] = Field(
        "text", description="text: plain text; html or xml: only text is translated, inline tags (b, i, a, span...) "
                            "are put back around the words they belong to, attributes, void tags and entities are "
                            "kept, code/pre/translate=\"no\"/class=\"notranslate\" are copied verbatim; malformed "
                            "xml is a 422 that says where")
    protected_terms: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=100,
        description="terms copied exactly (product names), besides what is always protected: placeholders (%s, "
                    "%(name)s, {0}, {{name}}), URLs, e-mail addresses, paths, versions, dates and numbers")
    return_attention: bool = Field(_DEFAULTS.return_attention, description=(
        "per sentence and output token, the cross-attention over the source tokens (last decoder layer, mean "
        "over heads)"))

    def decoding_options(self, defaults: DecodingOptions) -> DecodingOptions:
        """The request's options over ``defaults`` (the model's): only fields the client sent override.

        Raises engine.errors.InvalidRequestError for cross-field violations (e.g. n_best > beam_size).
        """
        fields = {f.name for f in dataclasses.fields(DecodingOptions)}
        return dataclasses.replace(defaults, **{k: getattr(self, k) for k in self.model_fields_set if k in fields})

    def prefixes(self) -> list[str | None]:
        """One target prefix (or None) per text. Raises InvalidRequestError on a count mismatch."""
        n = len(self.texts())
        if self.target_prefix is None or isinstance(self.target_prefix, str):
            return [self.target_prefix] * n
        if len(self.target_prefix) != n:
            raise InvalidRequestError(f"target_prefix has {len(self.target_prefix)} entries for {n} texts")
        return list(self.target_prefix)

    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class ExplainRequest(BaseModel):
    """POST /v1/explain body: one sentence, and optionally the target to explain (default: its translation with the
    model's default options)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"text": "The file could not be opened."}]})

    text: str = Field(description="one sentence (at most 128 tokens)")
    model: str | None = Field(None, description="model id; default: the deployment's model")
    target: str | None = Field(None, description="a translation to explain instead of the model's own")


class ExplainResponse(BaseModel):
    """Attention weights, every row summing to 1. Decoder positions are the decoder's inputs (<s>, then the target
    tokens): position i is where target token i was predicted (the last predicted the end of the sentence)."""

    model: str
    translation: str
    source_tokens: list[str] = Field(description="sentencepiece pieces of the source, eos last")
    target_tokens: list[str] = Field(description="pieces of the translation (eos excluded)")
    decoder_input_tokens: list[str] = Field(description="<s>, then target_tokens: the decoder's positions")
    encoder_self_attention: list = Field(description="[encoder layer][head][source][source]")
    decoder_self_attention: list = Field(description="[decoder layer][head][decoder position][decoder position] "
                                                     "(masked: nothing above the diagonal)")
    cross_attention: list = Field(description="[decoder layer][head][decoder position][source]")


class Hypothesis(BaseModel):
    text: str
    score: float = Field(description="summed natural-log probability of the tokens, eos included")


class SentenceAttention(BaseModel):
    source_tokens: list[str] = Field(description="sentencepiece pieces of the source sentence, eos last")
    target_tokens: list[str] = Field(description="pieces of the best translation (eos excluded)")
    weights: list[list[float]] = Field(description="[target token][source token], rows sum to 1")


class Translation(BaseModel):
    text: str
    score: float | None = None
    n_best: list[Hypothesis] | None = None
    attention: list[SentenceAttention] | None = Field(None, description="one entry per sentence of the text")


class TranslateResponse(BaseModel):
    model: str
    translations: list[Translation]


class StreamRecord(BaseModel):
    """One line of a ``stream: true`` answer. ``type`` is "sentence" (index: the text, sentence: its position in
    the text, text: its translation), "translation" (index, and the fields of Translation: the whole text with its
    layout), "done" (model) or "error" (status: the HTTP status the error would have had, error: ErrorDetail; the
    stream ends there)."""

    type: str
    index: int | None = None
    sentence: int | None = None
    text: str | None = None
    model: str | None = None
    status: int | None = None


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    """The one error body of every non-2xx answer."""

    error: ErrorDetail


class Health(BaseModel):
    status: str
    model: str
    provider: str
    max_src_tokens: int
    max_texts_per_request: int
    max_chars_per_text: int
    intra_op_threads: int = Field(description="ONNX Runtime intra-op threads of each engine (0: ONNX Runtime's "
                                  "choice, every physical core)")
    replica: str = Field(description="Serve replica id that answered")
    node_id: str = Field(description="Ray node the replica runs on")
    pid: int = Field(description="process id of the replica")
