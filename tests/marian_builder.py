"""Builds a small Hugging Face MarianMTModel folder offline (no download): sentencepiece models trained on a few
sentences, a shared vocab.json, and a model with random weights given a few steps of a copy task so that its
outputs depend on the source."""

import json
from pathlib import Path

import sentencepiece as spm
import torch


def build_marian_folder(out: Path, sentences: list[str], seed: int = 0) -> Path:
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    out.mkdir(parents=True, exist_ok=True)
    german = ["Die Datei konnte nicht geöffnet werden.", "Klicken Sie auf die Schaltfläche.",
              "Wählen Sie die Zelle aus.", "Der Drucker ist nicht verfügbar."]
    for name, lines in (("source", sentences), ("target", german * 6)):
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 5), model_prefix=str(out / name),
                                       vocab_size=120, model_type="unigram", minloglevel=2, unk_id=2, bos_id=-1,
                                       eos_id=1, pad_id=-1, hard_vocab_limit=False)
        (out / f"{name}.model").rename(out / f"{name}.spm")
    vocab = {"</s>": 0, "<unk>": 1}
    for name in ("source", "target"):
        sp = spm.SentencePieceProcessor(model_file=str(out / f"{name}.spm"))
        for piece in (sp.id_to_piece(i) for i in range(sp.get_piece_size())):
            if piece not in vocab and piece not in ("<unk>", "</s>", "<s>"):
                vocab[piece] = len(vocab)
    vocab["<pad>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    config = MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        activation_function="swish", scale_embedding=True, pad_token_id=len(vocab) - 1, eos_token_id=0,
        decoder_start_token_id=len(vocab) - 1, unk_token_id=1, forced_eos_token_id=None, init_std=0.1)
    torch.manual_seed(seed)
    model = MarianMTModel(config)
    tokenizer = MarianTokenizer(source_spm=str(out / "source.spm"), target_spm=str(out / "target.spm"),
                                vocab=str(out / "vocab.json"))
    batch = tokenizer(sentences, text_target=sentences, return_tensors="pt", padding=True)
    batch["labels"][batch["labels"] == config.pad_token_id] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.1)  # exercise the bias path of the import
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
