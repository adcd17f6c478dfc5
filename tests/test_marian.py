"""Importing a Hugging Face MarianMTModel: tokenization, and translations token-identical to transformers'
generate() with the same beam settings."""

import json
import shutil

import pytest
import torch

from engine.options import DecodingOptions
from engine.runtime import EngineConfig
from engine.translator import Translator
from export.import_marian import UnsupportedCheckpointError, import_marian

from conftest import PARITY_SENTENCES

MAX_NEW_TOKENS = 12


def hf_generate(model, ids: list[int], beam_size: int) -> list[int]:
    """transformers' beam search with the engine's semantics: no length normalization (length_penalty 0 on both
    sides), stop at beam_size finished hypotheses, pad never generated, no forced eos."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), num_beams=beam_size, early_stopping=True, length_penalty=0.0,
                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False, forced_eos_token_id=None,
                             bad_words_ids=[[model.config.pad_token_id]])
    return [t for t in out[0].tolist()[1:] if t not in (model.config.eos_token_id, model.config.pad_token_id)]


@pytest.fixture(scope="module")
def hf(marian_hf):
    from transformers import MarianMTModel, MarianTokenizer

    return MarianMTModel.from_pretrained(marian_hf).eval(), MarianTokenizer.from_pretrained(marian_hf)


@pytest.fixture(scope="module")
def marian(marian_artifact):
    return Translator(marian_artifact, EngineConfig(device="cpu"))


def test_tokenization_matches_transformers(hf, marian):
    _, tokenizer = hf
    for sentence in PARITY_SENTENCES:
        assert marian.tokenize(sentence) == tokenizer(sentence).input_ids


@pytest.mark.parametrize("beam_size", [1, 4])
def test_translations_are_token_identical_to_transformers_generate(hf, marian, beam_size):
    model, tokenizer = hf
    options = DecodingOptions(beam_size=beam_size, length_penalty=0.0, max_length=MAX_NEW_TOKENS)
    ours = marian.translate_ids([marian.tokenize(s) for s in PARITY_SENTENCES], options)
    outputs = set()
    for sentence, hyps in zip(PARITY_SENTENCES, ours):
        expected = hf_generate(model, tokenizer(sentence).input_ids, beam_size)
        assert hyps[0].tokens == expected, sentence
        assert marian.detokenize(hyps[0].tokens) == tokenizer.decode(expected, skip_special_tokens=True)
        outputs.add(tuple(expected))
    assert len(outputs) > 1  # the outputs depend on the source: the comparison is not vacuous


def test_marian_variants_are_imported(marian_hf, marian):
    config = json.loads((marian.artifact_dir / "config.json").read_text())
    assert (config["activation"], config["tokenizer"], config["scale_embedding"]) == ("swish", "marian", True)
    assert config["bos_id"] == config["pad_id"]  # Marian starts decoding from pad


def test_unsupported_checkpoints_are_refused_with_the_reason(marian_hf, tmp_path):
    folder = tmp_path / "prenorm"
    shutil.copytree(marian_hf, folder)
    config = json.loads((folder / "config.json").read_text())
    config["normalize_before"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedCheckpointError, match="normalize_before"):
        import_marian(folder, tmp_path / "out")
