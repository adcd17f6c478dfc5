"""A Transformer-base checkpoint with random weights, the size published engine figures use (speed only).

    .venv/bin/python -m loadtests.base_model --out artifacts/bench/transformer-base-checkpoint

6 + 6 layers, d_model 512, 8 heads, d_ff 2048 (Vaswani et al. 2017, table 3 "base"), the bundled model's
8000-piece sentencepiece vocabulary. Untrained: its translations are noise, so it is only timed on the fixed-length
workload, where output quality cannot change the work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nmt.config import ModelConfig
from nmt.model import Transformer
from nmt.train import save_model

BASE = dict(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6)


def make_base_checkpoint(out: str | Path, spm_model: str | Path = "models/en-de/spm.model", seed: int = 0) -> Path:
    """Writes the random-weight checkpoint folder (model.safetensors, config.json, spm.model); returns ``out``."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=8000, **BASE))
    save_model(model, Path(out), Path(spm_model), {"note": "random weights, for speed benchmarks only"})
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="artifacts/bench/transformer-base-checkpoint")
    args = p.parse_args(argv)
    print(make_base_checkpoint(args.out))


if __name__ == "__main__":
    main()
