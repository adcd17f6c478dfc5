"""Training command: runs, validates, writes a loadable best model, and resumes from its checkpoint."""

import gzip
import json

import torch

from export.onnx_export import load_checkpoint
from nmt import train

PAIRS = [
    ("The file could not be opened.", "Die Datei konnte nicht geöffnet werden."),
    ("Click the button.", "Klicken Sie auf die Schaltfläche."),
    ("Save the document.", "Speichern Sie das Dokument."),
    ("Select the cell.", "Wählen Sie die Zelle aus."),
    ("The printer is not available.", "Der Drucker ist nicht verfügbar."),
    ("Delete the selected entries.", "Löschen Sie die ausgewählten Einträge."),
]


def write_corpus(folder):
    for split, repeat in (("train", 40), ("dev", 1)):
        with gzip.open(folder / f"{split}.tsv.gz", "wt", encoding="utf-8") as f:
            f.write("source\ten\tde\n")
            for i in range(repeat):
                for en, de in PAIRS:
                    f.write(f"test\t{en}\t{de}\n")


def test_train_validates_saves_and_resumes(tmp_path):
    write_corpus(tmp_path)
    out = tmp_path / "run"
    common = ["--corpus", str(tmp_path), "--out", str(out), "--vocab-size", "70", "--d-model", "32",
              "--n-heads", "2", "--d-ff", "64", "--layers", "1", "--max-batch-tokens", "200", "--threads", "1",
              "--warmup-steps", "5", "--lr", "3e-3"]
    train.main(common + ["--max-steps", "15"])
    state = torch.load(out / "checkpoint.pt", weights_only=False)["state"]
    assert state["step"] == 15 and state["history"]
    first_dev = state["history"][0]["dev_nll"]

    train.main(common + ["--max-steps", "60"])  # resumes: continues from step 15, not from 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)["state"]
    assert state["step"] == 60
    assert state["best_dev"] < first_dev  # it learned something on this tiny, repetitive corpus
    log = json.loads((out / "best" / "train_log.json").read_text())
    assert log["best_dev"] == state["best_dev"]
    model = load_checkpoint(out / "best")  # the best model loads as a checkpoint for export
    assert model.cfg.d_model == 32
