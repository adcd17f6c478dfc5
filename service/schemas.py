"""HTTP request/response models (pydantic). Decoding defaults come from engine.options.DecodingOptions."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from engine.options import MAX_BEAM_SIZE, DecodingOptions

_DEFAULTS = DecodingOptions()


class TranslateRequest(BaseModel):
    """POST /translate body. ``text`` is one text or a list of texts; each is translated as one sentence."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"text": ["The file could not be opened.", "Click the button to save the document."], "beam_size": 4}]})

    text: str | list[str] = Field(description="one text or a list of texts (limits in GET /health)")
    model: str | None = Field(None, description="model id; default: the deployment's model")
    beam_size: int = Field(_DEFAULTS.beam_size, ge=1, le=MAX_BEAM_SIZE, description="1 = greedy search")
    length_penalty: float = Field(_DEFAULTS.length_penalty, ge=0.0, le=10.0,
                                  description="GNMT alpha: ranking score = logprob / ((5 + len) / 6) ** alpha")
    n_best: int = Field(_DEFAULTS.n_best, ge=1, le=MAX_BEAM_SIZE, description="hypotheses per text, <= beam_size")
    max_length: int = Field(_DEFAULTS.max_length, ge=1, le=4096,
                            description="max generated tokens; also bounded by 2 * src_len + 10 and the model")
    min_length: int = Field(_DEFAULTS.min_length, ge=0, le=4096, description="min generated tokens before eos")
    return_scores: bool = Field(False, description="include summed log-prob scores and n_best hypotheses")

    def decoding_options(self) -> DecodingOptions:
        """Raises engine.errors.InvalidRequestError for cross-field violations (e.g. n_best > beam_size)."""
        return DecodingOptions(beam_size=self.beam_size, length_penalty=self.length_penalty, n_best=self.n_best,
                               max_length=self.max_length, min_length=self.min_length)

    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text)


class Hypothesis(BaseModel):
    text: str
    score: float = Field(description="summed natural-log probability of the tokens, eos included")


class Translation(BaseModel):
    text: str
    score: float | None = None
    n_best: list[Hypothesis] | None = None


class TranslateResponse(BaseModel):
    model: str
    translations: list[Translation]


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
    replica: str = Field(description="Serve replica id that answered")
    node_id: str = Field(description="Ray node the replica runs on")
    pid: int = Field(description="process id of the replica")
