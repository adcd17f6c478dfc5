"""The machine's limit: measured GEMM FLOP/s, and the model's FLOPs per generated target token.

    .venv/bin/python -m loadtests.flops --threads 1 --config models/en-de/config.json

One multiply-add counts as 2 FLOPs. Per decoder row and step (Vaswani et al. 2017, section 3; cross-attention K/V
are computed once per sentence by the encoder graph, so they are charged to the encoder):
    per decoder layer: self-attention projections 4 d^2 + cross-attention Q and output 2 d^2 + FFN 2 d d_ff
                       + attention scores and weighted sums 2 d (t + S)
    output projection: d V
Per source token, encoder layer: 4 d^2 + 2 d d_ff + 2 d S; plus the cross K/V projections 2 d^2 per decoder layer.
A generated target token costs beam_size decoder rows plus its share of the encoder (S source / T target tokens).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nmt.config import ModelConfig


def flops_per_target_token(cfg: ModelConfig, beam_size: int, src_len: float, tgt_len: float) -> float:
    """FLOPs to generate one target token, averaged over a sentence of ``src_len`` source and ``tgt_len`` target
    tokens (both in tokens, eos included), with ``beam_size`` decoder rows per sentence."""
    d, d_ff, vocab = cfg.d_model, cfg.d_ff, cfg.vocab_size
    mean_past = (tgt_len + 1) / 2  # self-attention length grows 1 .. tgt_len
    decoder_row = (cfg.n_decoder_layers * (6 * d * d + 2 * d * d_ff + 2 * d * (mean_past + src_len))
                   + d * vocab)
    encoder_per_src_token = (cfg.n_encoder_layers * (4 * d * d + 2 * d * d_ff + 2 * d * src_len)
                             + cfg.n_decoder_layers * 2 * d * d)
    macs = beam_size * decoder_row + encoder_per_src_token * src_len / tgt_len
    return 2.0 * macs


def gemm_flops(threads: int, shapes: tuple[tuple[int, int, int], ...] = ((2048, 2048, 2048),),
               min_seconds: float = 1.0) -> dict[str, float]:
    """Measured float32 GEMM speed of torch (MKL/oneDNN) with ``threads`` threads, FLOP/s per (m, k, n) shape.

    Returns {"mxkxn": FLOP/s}; the best of repeated runs lasting at least ``min_seconds`` seconds.
    """
    torch.set_num_threads(threads)
    return _timed_gemms(shapes, min_seconds, "cpu", torch.float32)


def cuda_gemm_flops(shapes: tuple[tuple[int, int, int], ...] = ((8192, 8192, 8192),),
                    min_seconds: float = 1.0) -> dict[str, float]:
    """Measured GEMM speed of torch (cuBLAS) on the first GPU, FLOP/s per "dtype mxkxn": float32 (TF32 off, the
    float32 engine's arithmetic) and float16 (tensor cores, the float16 engine's)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {}
    for dtype in (torch.float32, torch.float16):
        for name, value in _timed_gemms(shapes, min_seconds, "cuda", dtype).items():
            results[f"{str(dtype).removeprefix('torch.')} {name}"] = value
    return results


def _timed_gemms(shapes, min_seconds: float, device: str, dtype) -> dict[str, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    results = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        a @ b  # warm-up: thread pool, packing buffers, cuBLAS handles
        sync()
        best, spent = float("inf"), 0.0
        while spent < min_seconds:
            started = time.perf_counter()
            a @ b
            sync()
            seconds = time.perf_counter() - started
            best, spent = min(best, seconds), spent + seconds
        results[f"{m}x{k}x{n}"] = 2.0 * m * k * n / best
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--config", default="models/en-de/config.json")
    args = p.parse_args(argv)
    cfg = ModelConfig.from_json(args.config)
    peak = gemm_flops(args.threads, ((2048, 2048, 2048), (4, cfg.d_model, cfg.d_ff), (400, cfg.d_model, cfg.d_ff)))
    print(json.dumps(dict(threads=args.threads, gemm_gflops={k: round(v / 1e9, 1) for k, v in peak.items()},
                          mflop_per_token={f"beam{b}": round(flops_per_target_token(cfg, b, 20, 20) / 1e6, 2)
                                           for b in (1, 4)})))


if __name__ == "__main__":
    main()
