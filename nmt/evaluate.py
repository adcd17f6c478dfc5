"""BLEU and chrF (sacrebleu) of a model on a corpus split.

    python -m nmt.evaluate --artifact artifacts/en-de --split test --beam-size 4      # the served ONNX path
    python -m nmt.evaluate --checkpoint models/en-de --split dev --beam-size 1       # PyTorch reference search

Prints one JSON line: split, sentences, decoding, BLEU, chrF, seconds, and the sacrebleu signatures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import sacrebleu

from nmt.data import read_pairs


def _translate_with_artifact(artifact: str, sources: list[str], beam_size: int, threads: int) -> list[str]:
    from engine.options import DecodingOptions  # the served path; imported only when asked for
    from engine.runtime import EngineConfig
    from engine.translator import Translator

    translator = Translator(artifact, EngineConfig(intra_op_threads=threads))
    return [t.text for t in translator.translate(sources, DecodingOptions(beam_size=beam_size))]


def _translate_with_checkpoint(checkpoint: str, sources: list[str], beam_size: int, threads: int) -> list[str]:
    import sentencepiece as spm
    import torch
    from safetensors.torch import load_file

    from engine.options import DecodingOptions  # pure Python: the same length bound as the engine
    from nmt import search
    from nmt.config import ModelConfig
    from nmt.model import Transformer

    if threads:
        torch.set_num_threads(threads)
    folder = Path(checkpoint)
    model = Transformer(ModelConfig.from_json(folder / "config.json"))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    model.eval()
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spm.model"))
    out = []
    for text in sources:
        ids = sp.encode(text) + [model.cfg.eos_id]
        limit = DecodingOptions().length_limit(len(ids), model.cfg.max_positions)
        if beam_size == 1:
            hyp = search.greedy_search(model, ids, limit)
        else:
            hyp = search.beam_search(model, ids, beam_size, limit)[0]
        out.append(sp.decode(hyp.tokens))
    return out


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF with sacrebleu's default tokenization (13a) and signatures."""
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    return dict(BLEU=round(bleu.corpus_score(hypotheses, [references]).score, 2),
                chrF=round(chrf.corpus_score(hypotheses, [references]).score, 2),
                bleu_signature=str(bleu.get_signature()), chrf_signature=str(chrf.get_signature()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--artifact", help="exported ONNX artifact folder (engine path)")
    source.add_argument("--checkpoint", help="PyTorch checkpoint folder (reference search)")
    p.add_argument("--corpus", default="../shared/corpus")
    p.add_argument("--split", default="test", choices=["dev", "test"])
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--limit", type=int, default=0, help="first N pairs only (0 = all)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", help="write hypotheses here, one a line")
    args = p.parse_args(argv)

    pairs = read_pairs(Path(args.corpus) / f"{args.split}.tsv.gz")
    if args.limit:
        pairs = pairs[: args.limit]
    sources, references = [en for en, _ in pairs], [de for _, de in pairs]
    started = time.perf_counter()
    if args.artifact:
        hypotheses = _translate_with_artifact(args.artifact, sources, args.beam_size, args.threads)
    else:
        hypotheses = _translate_with_checkpoint(args.checkpoint, sources, args.beam_size, args.threads)
    seconds = time.perf_counter() - started
    if args.output:
        Path(args.output).write_text("\n".join(hypotheses) + "\n")
    result = dict(split=args.split, sentences=len(pairs), beam_size=args.beam_size,
                  path="onnx" if args.artifact else "pytorch", seconds=round(seconds, 1),
                  **score(hypotheses, references))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
