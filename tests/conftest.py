"""Shared fixtures: the bundled checkpoint, its ONNX export (made once per session), the engine, a Ray Serve app."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

# Before Ray is imported anywhere: no usage stats, and Ray's token authentication on every test cluster (as in every
# way the project starts Ray), with a token made for this test session in a temporary folder, so that the tests
# neither need nor touch the quick start's ~/.ray/auth_token. Every Ray process of the tests inherits it.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")
# HTTP through HAProxy to the replicas, as scripts/serve.sh and the images serve it.
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
if os.environ["RAY_AUTH_MODE"] == "token" and not (os.environ.get("RAY_AUTH_TOKEN")
                                                   or os.environ.get("RAY_AUTH_TOKEN_PATH")):
    import atexit
    import secrets
    import shutil
    import tempfile

    _token_dir = tempfile.mkdtemp(prefix="nmt-test-ray-auth-")
    atexit.register(shutil.rmtree, _token_dir, ignore_errors=True)
    _token_file = Path(_token_dir) / "auth_token"
    _token_file.write_text(secrets.token_hex(32))
    _token_file.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(_token_file)

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "models" / "en-de"
PARITY_SENTENCES = [s for s in (ROOT / "export" / "parity_sentences.txt").read_text().splitlines() if s.strip()]

# Real English sentences of the corpus's domain, of mixed lengths (batch invariance needs mixed lengths).
SENTENCES = [
    "The file could not be opened.",
    "Click the button to save the document.",
    "Select the cell.",
    "This command inserts a new table at the current cursor position in the document.",
    "Error",
    "The printer is not available.",
    "Do you want to delete the selected entries?",
    "Opens a dialog where you can change the properties of the selected object and apply them to all pages.",
]


class NaNAfterToken:
    """Wraps an engine model: the log-probs of rows whose last token is ``token`` become NaN (how a float16
    overflow shows), so that one sentence of a batch fails and the others must not."""

    def __init__(self, model, token: int) -> None:
        self.model, self.token = model, token
        self.ops, self.top_k, self.io_binding = model.ops, model.top_k, model.io_binding

    def encode(self, *args):
        return self.model.encode(*args)

    def step(self, tokens, *args, **kwargs):
        log_probs, k, v, attention = self.model.step(tokens, *args, **kwargs)
        log_probs[tokens[:, 0] == self.token] = float("nan")
        return log_probs, k, v, attention


class BlockingStep:
    """Wraps an engine model: each decoder step waits until ``release`` is set (a step that hangs); ``entered`` is
    set once a step has started."""

    def __init__(self, model) -> None:
        self.model, self.release, self.entered = model, threading.Event(), threading.Event()
        self.ops, self.top_k, self.io_binding = model.ops, model.top_k, model.io_binding

    def encode(self, *args):
        return self.model.encode(*args)

    def step(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(60)
        return self.model.step(*args, **kwargs)


def resident_bytes() -> int:
    """This process's resident memory in bytes (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def torch_model():
    from export.onnx_export import load_checkpoint

    return load_checkpoint(CHECKPOINT)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(artifact folder, manifest): the bundled checkpoint exported with the real export command's function."""
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("artifact") / "en-de"
    manifest = export_checkpoint(CHECKPOINT, out, PARITY_SENTENCES)
    return out, manifest


@pytest.fixture(scope="session")
def artifact(exported) -> Path:
    return exported[0]


@pytest.fixture(scope="session")
def translator(artifact):
    from engine.runtime import EngineConfig
    from engine.translator import Translator

    return Translator(artifact, EngineConfig(device="cpu"))


@pytest.fixture(scope="session")
def marian_hf(tmp_path_factory):
    """A small MarianMTModel folder in the Hugging Face layout, built offline."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from marian_builder import build_marian_folder

    return build_marian_folder(tmp_path_factory.mktemp("marian") / "hf", PARITY_SENTENCES)


@pytest.fixture(scope="session")
def marian_artifact(marian_hf, tmp_path_factory):
    """The Marian folder imported into our checkpoint format and exported to ONNX (with its parity check)."""
    from export.import_marian import import_marian
    from export.onnx_export import export_checkpoint

    root = tmp_path_factory.mktemp("marian-import")
    import_marian(marian_hf, root / "checkpoint")
    export_checkpoint(root / "checkpoint", root / "artifact", PARITY_SENTENCES)
    return root / "artifact"
