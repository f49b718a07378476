"""Zero-shot baseline with a tiny random CLIP saved to tmp_path: the CLI run, the run folder, the
Runs-table row and what the run-management actions say about it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vitft_app.cli import main
from vitft_app.runs_table import runs_table
from vitft_app.zero_shot import (
    ZeroShotError, check_template, class_prompts, evaluate_zero_shot, is_zero_shot_run, zero_shot_refusal,
)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE (GPT-2 / CLIP ``bytes_to_unicode``)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for byte in range(256):
        if byte not in keep:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def save_tiny_clip(folder: Path, image_size: int = 32) -> Path:
    """A tiny random CLIP (2 text + 2 vision blocks, width 32) with a real CLIPTokenizer built offline
    from a byte-level vocabulary without merges (every character is one token), saved with its
    CLIPProcessor so AutoModel / AutoProcessor load it like a Hub checkpoint."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)} | {c + "</w>": 256 + i for i, c in enumerate(alphabet)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                                                 crop_size={"height": image_size, "width": image_size}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def test_cli_zero_shot_saves_a_row_of_its_own(tmp_path, digits_small, tiny_clip, capsys):
    runs = tmp_path / "runs"
    code = main(["zero-shot", "--data", str(digits_small), "--model", str(tiny_clip), "--template", "a digit {}",
                 "--output-dir", str(runs)])
    out, err = capsys.readouterr()
    assert code == 0, err
    run_dir = Path(out.strip().splitlines()[-1])
    assert run_dir.parent == runs and is_zero_shot_run(run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    # vitft's own split: 3 classes x 20 digits, 4 of each class in validation (val_fraction 0.2)
    assert status["num_val"] == 12 and status["status"] == "completed"
    assert status["prompts"] == ["a digit 0", "a digit 1", "a digit 7"]
    assert status["val_baseline"] == {"majority_class": "0", "majority_count": 4, "total": 12, "num_classes": 3}
    assert 0 <= status["best_val_accuracy"] <= 1 and status["correct"] == round(12 * status["best_val_accuracy"])
    assert config == {"kind": "zero-shot", "data_dir": str(digits_small), "model": str(tiny_clip),
                      "template": "a digit {}", "val_fraction": 0.2, "seed": 42}
    assert "zero-shot" in err and "always '0': 33.3%" in err
    if status["best_val_accuracy"] < 0.333 + 0.05:  # a random CLIP is near chance: called weak
        assert "Weak baseline" in err

    table = runs_table(runs)
    row = table.iloc[0]
    assert row["kind"] == "zero-shot" and row["model"] == tiny_clip.name and row["dataset"] == "digits3"
    assert row["best_val_accuracy"] == pytest.approx(status["best_val_accuracy"])
    assert row["val_baseline"] == pytest.approx(1 / 3) and row["status"] == "completed"


def test_runs_tab_row_and_actions(tmp_path, digits_small, tiny_clip):
    from types import SimpleNamespace

    from vitft_app.ui import runs_tab
    from vitft_app.zero_shot import save_zero_shot_run

    runs = tmp_path / "runs"
    run_dir = save_zero_shot_run(evaluate_zero_shot(digits_small, str(tiny_clip)), runs)
    ctx = SimpleNamespace(settings=SimpleNamespace(runs_dir=str(runs)), runner=SimpleNamespace(current=None))
    shown = runs_tab.table_view(ctx)
    assert shown.iloc[0]["epochs"] == "zero-shot" and shown.iloc[0]["model"] == f"{tiny_clip.name} (zero-shot)"
    assert shown.iloc[0]["best_val_accuracy"].endswith("%") or "(weak)" in shown.iloc[0]["best_val_accuracy"]
    assert shown.iloc[0]["val_baseline"] == "33.3% ('0')"
    assert runs_tab.table_view(ctx, sort_by="epochs").iloc[0]["epochs"] == "zero-shot"  # sorting does not break
    assert "nothing to resume" in runs_tab.resume_selected(ctx, str(run_dir))
    _, message, switch = runs_tab.open_in(ctx, str(run_dir), "evaluate")
    assert "zero-shot baseline (no trained model)" in message and not switch
    _, message, switch = runs_tab.open_in(ctx, str(run_dir), "predict")
    assert "nothing to predict" in message and not switch
    message, _ = runs_tab.ask_delete(ctx, str(run_dir))
    assert "Delete" in message
    message, _ = runs_tab.confirm_delete(ctx, str(run_dir))
    assert message.startswith("✓ Deleted") and not run_dir.exists()


def test_cli_resume_and_evaluate_refuse_a_zero_shot_run(tmp_path, digits_small, tiny_clip, capsys):
    from vitft_app.zero_shot import save_zero_shot_run

    run_dir = save_zero_shot_run(evaluate_zero_shot(digits_small, str(tiny_clip)), tmp_path / "runs")
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(["evaluate", str(run_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_bad_inputs_are_one_line(tmp_path, digits_small, tiny_vit, capsys):
    assert main(["zero-shot", "--data", str(digits_small), "--model", "openai/clip-vit-base-patch32-not-here",
                 "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "Hugging Face Hub" in err and len(err.strip().splitlines()) == 1
    assert main(["zero-shot", "--data", str(digits_small), "--model", str(tiny_vit), "--output-dir", str(tmp_path)]) == 2
    assert "zero-shot needs an image-text model" in capsys.readouterr().err
    assert main(["zero-shot", "--data", str(tmp_path / "nope"), "--model", str(tiny_vit)]) == 2
    assert "Cannot read the dataset" in capsys.readouterr().err
    assert not list(tmp_path.glob("*zero-shot*"))


def test_template_rules():
    assert check_template("") == "a photo of a {}."
    assert class_prompts(["golden_retriever"], "a photo of a {}.") == ["a photo of a golden retriever."]
    for bad in ("no slot", "{} and {}", "{name}"):
        with pytest.raises(ZeroShotError, match="exactly once"):
            check_template(bad)
    assert zero_shot_refusal(None, "resume") is None


def test_help_lists_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["zero-shot", "--help"])
    out = capsys.readouterr().out
    assert "--template" in out and "openai/clip-vit-base-patch32" in out
