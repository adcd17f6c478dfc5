"""Engine error hierarchy. The service maps each type to one HTTP status in one table (service/errors.py)."""


class EngineError(Exception):
    """Base class of the errors the engine raises on purpose."""


class InvalidRequestError(EngineError):
    """The request itself is wrong (bad option value, unknown model); the client can fix it. HTTP 422."""


class InputTooLongError(InvalidRequestError):
    """A sentence has more tokens than the model's positions allow. HTTP 413."""

    def __init__(self, n_tokens: int, limit: int) -> None:
        super().__init__(f"source has {n_tokens} tokens > limit {limit}; split the text into shorter sentences")
        self.n_tokens, self.limit = n_tokens, limit

    def __reduce__(self):  # rebuilt from its fields, not its message (an engine process sends it over a pipe)
        return type(self), (self.n_tokens, self.limit)


class EngineUnavailableError(EngineError):
    """The engine cannot serve (model not loaded, provider failed, its process exited). HTTP 503, with a
    Retry-After of ``retry_after_s`` seconds when given."""

    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NumericalError(EngineError):
    """The model produced NaN log-probs for this input (e.g. a float16 copy overflowing). HTTP 500: not the
    client's fault; the service retries a failed batch's sentences one by one, so only this sentence fails."""

    def __init__(self, message: str = "the decoder produced NaN log-probs for this input (a float16 overflow?)"):
        super().__init__(message)


class NotAvailableError(EngineError):
    """The model's artifact lacks what the request needs (explain.onnx for the attention view). HTTP 404."""
