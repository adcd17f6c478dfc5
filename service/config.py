"""The replica's configuration: application arguments (the Serve config's ``args``) and the live engine budgets
(the deployment's ``user_config``), validated by pydantic at the edge."""

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.core import MAX_BATCHES

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class AppArgs(BaseModel):
    """Application arguments (the ``args`` of the Serve config). Relative paths are relative to the project."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: str = "artifacts/en-de"
    model_id: str = Field("en-de", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="the default model's id")
    models: dict[str, str] = Field(default_factory=dict, description="more models served side by side: id -> "
                                                                     "artifact folder")
    device: str = "auto"
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads of each engine; 0: as many as "
                                  "the CPUs Ray reserves for the replica (ray_actor_options.num_cpus), at least 1 "
                                  "(service.app.engine_threads)")
    intra_op_spinning: bool = Field(False, description="those threads busy-wait between kernels (EngineConfig."
                                    "intra_op_spinning): off, since a replica shares its cores")
    scheduling: Literal["continuous", "static"] = Field(
        "continuous", description="continuous: sentences join a running decode between steps; static: a batch "
                                  "decodes to completion before the next forms (kept to measure against)")
    engine_process: bool = Field(False, description="run each model's engine core in a child process of the replica "
                                 "(engine/process_engine.py) instead of a thread, so that request handling and "
                                 "decoding do not share one GIL")
    engine_stall_s: float = Field(30.0, gt=0, description="an engine that has held work this long without finishing "
                                  "a decoder step is hung (a stopped process, a kernel that never returns): /health "
                                  "answers 503 and Serve's health check fails, so the replica is replaced; a step "
                                  "takes milliseconds to a fraction of a second")
    max_batches: int = Field(MAX_BATCHES, ge=1, le=16, description="continuous: batches of small requests and of "
                             "larger ones that decode side by side, sharing decoder time (engine/core.py); 1: one "
                             "batch for every sentence")
    max_batch_tokens: int = Field(1024, ge=1, description="padded source tokens decoding together (sentences x "
                                                          "longest source); user_config can change it live")
    max_batch_rows: int = Field(512, ge=1, description="decoder rows per step (sentences x beams); user_config can "
                                                       "change it live")
    max_texts_per_request: int = Field(64, ge=1)
    max_chars_per_text: int = Field(100_000, ge=1, description="characters of one text: a document is one text, split "
                                    "into paragraphs and sentences (413 beyond, naming this limit)")
    max_chars_per_request: int = Field(100_000, ge=1, description="characters in all texts of one request")
    max_body_bytes: int = Field(1_000_000, ge=1)
    body_timeout_s: float = Field(10.0, gt=0, description="time to receive a request's whole body (408 past it): a "
                                  "client that sends its body byte by byte holds a max_ongoing_requests slot")
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of one request in the replica (504 past it)")
    timeout_s_per_sentence: float = Field(0.0, ge=0, description="added to a request's deadline for each of its "
                                          "sentences, so that a document of 1,000 sentences gets time for its size "
                                          "(deploy/serve_config.yaml: 0.1)")
    max_sentences_per_request: int = Field(4096, ge=1, description="sentences after splitting (413 beyond); a "
                                           "request's sentences share the engine fairly with other requests' "
                                           "(engine/core.py), so this bounds work, not waiting")
    max_queued_work: int = Field(65536, ge=1, description="work queued or decoding in this replica (token-rows: "
                                 "beam_size x (source + expected target tokens), summed over sentences; "
                                 "engine.async_engine.AsyncEngine.work) beyond which a bulk request gets a JSON 503 "
                                 "with Retry-After (admission control)")
    interactive_max_sentences: int = Field(4, ge=0, description="requests of at most this many sentences are "
                                           "interactive: admitted until the interactive work queued reaches twice "
                                           "max_queued_work, so that they still get in while bulk requests (a "
                                           "document) fill the queue")
    retry_after_s: int = Field(1, ge=0, description="the least Retry-After of that 503, seconds (it grows with the "
                                                    "queued work over the engine's recent rate, up to 60 s)")
    api_keys_file: str | None = Field(
        default_factory=lambda: os.environ.get("NMT_API_KEYS_FILE") or None,
        description="API keys with their limits (service/api_keys.py; default: $NMT_API_KEYS_FILE): if set, "
                    "/translate and /v1/usage need a key (X-API-Key or Authorization: Bearer)")
    cors_allow_origins: list[str] = Field(default_factory=list, description="origins that browsers may call the "
                                          "API from (CORS); empty: none, ['*']: any")
    warmup: bool = True

    def artifact_paths(self) -> dict[str, Path]:
        """Model id -> artifact folder, the default model first."""
        folders = {self.model_id: self.artifact_dir, **self.models}
        return {mid: Path(f) if Path(f).is_absolute() else PROJECT_ROOT / f for mid, f in folders.items()}


class BatchConfig(BaseModel):
    """Live engine budgets (the deployment's ``user_config``; changed at runtime through reconfigure). None keeps
    the value of the application args."""

    model_config = ConfigDict(extra="forbid")

    max_batch_rows: int | None = Field(None, ge=1, le=65536, description="decoder rows per step")
    max_batch_tokens: int | None = Field(None, ge=1, le=1 << 20, description="padded source tokens decoding "
                                                                             "together")
