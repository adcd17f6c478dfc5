"""The explain path (engine/explain.py): every layer's and head's attention from explain.onnx, against PyTorch and
against what the serving graphs return."""

import numpy as np
import pytest
import torch

from engine import contract
from engine.errors import NotAvailableError
from engine.explain import Explainer
from engine.options import DecodingOptions

from conftest import SENTENCES


def test_manifest_records_explain_parity_within_1e_5(exported):
    _, manifest = exported
    assert contract.EXPLAIN_FILE in manifest["files"]
    assert manifest["parity"]["explain_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("sentence", SENTENCES[:4])
def test_every_layer_and_head_matches_pytorch(torch_model, translator, artifact, sentence):
    cfg = torch_model.cfg
    src = translator.tokenize(sentence)
    tgt = translator.translate_ids([src], DecodingOptions(beam_size=1))[0][0].tokens
    maps = Explainer(artifact, translator.bos_id).explain(src, tgt)
    assert maps.encoder.shape == (cfg.n_encoder_layers, cfg.n_heads, len(src), len(src))
    assert maps.decoder.shape == (cfg.n_decoder_layers, cfg.n_heads, len(tgt) + 1, len(tgt) + 1)
    assert maps.cross.shape == (cfg.n_decoder_layers, cfg.n_heads, len(tgt) + 1, len(src))
    with torch.no_grad():
        ids = torch.tensor([src])
        reference = torch_model.attention_maps(ids, torch.ones_like(ids, dtype=torch.bool),
                                               torch.tensor([[cfg.bos_id] + tgt]))
    for ours, ref in zip((maps.encoder, maps.decoder, maps.cross), reference):
        np.testing.assert_allclose(ours, ref[0].numpy(), atol=1e-5, rtol=0)
    # Masked decoder self-attention: nothing on later positions, and a longer target leaves the weights of the
    # earlier positions as they were.
    assert np.abs(np.triu(maps.decoder, k=1)).max() == 0.0
    longer = Explainer(artifact, translator.bos_id).explain(src, tgt + [tgt[0], tgt[-1]])
    n = len(tgt) + 1
    np.testing.assert_allclose(longer.decoder[:, :, :n, :n], maps.decoder, atol=1e-5)
    np.testing.assert_allclose(longer.cross[:, :, :n], maps.cross, atol=1e-5)
    np.testing.assert_allclose(longer.encoder, maps.encoder, atol=1e-5)


def test_cross_attention_is_the_served_alignment(translator, artifact):
    """The last decoder layer's cross-attention, mean over heads, at the position that predicted each token, is
    what the serving graph returns step by step with return_attention."""
    src = translator.tokenize(SENTENCES[1])
    hyp = translator.translate_ids([src], DecodingOptions(beam_size=1, return_attention=True))[0][0]
    maps = Explainer(artifact, translator.bos_id).explain(src, hyp.tokens)
    served = np.asarray(hyp.attention)
    assert served.shape == (len(hyp.tokens), len(src))
    np.testing.assert_allclose(maps.cross[-1].mean(0)[:len(hyp.tokens)], served, atol=1e-5)


def test_an_artifact_without_the_graph_says_how_to_re_export(tmp_path):
    with pytest.raises(NotAvailableError, match="re-export"):
        Explainer(tmp_path, bos_id=1).explain([5, 2], [7])
