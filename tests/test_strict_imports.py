"""Checkpoint imports never fall back silently: a part that cannot load is an error naming the
file and the keys, and what an import leaves behind is recorded (issue 19, item 5)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_depth_anything_model
from safetensors.torch import load_file, save_file

from mesadepth.errors import DataError


def _tiny_depth_anything(folder):
    model = tiny_depth_anything_model(28)
    from transformers import DPTImageProcessor

    model.save_pretrained(folder)
    DPTImageProcessor(size={"height": 28, "width": 28}, ensure_multiple_of=14).save_pretrained(
        folder
    )


def test_hf_teacher_with_weights_missing_from_its_file_is_an_error(tmp_path):
    from mesadepth.teachers import build_teacher

    folder = tmp_path / "da"
    _tiny_depth_anything(folder)
    build_teacher(f"hf:{folder}", device="cpu")  # the complete folder loads
    weights = folder / "model.safetensors"
    state = load_file(weights)
    gone = "head.conv1.weight"
    del state[gone]
    save_file(state, weights, metadata={"format": "pt"})
    # transformers would fill the gap with random values and only warn.
    with pytest.raises(DataError, match=rf"da: the weights do not cover .*{gone}"):
        build_teacher(f"hf:{folder}", device="cpu")


def test_finetune_init_from_an_official_file_records_what_it_dropped(tmp_path):
    from mesadepth.config import load_config
    from mesadepth.models.backbone import build_encoder, official_encoder_state
    from mesadepth.stages.finetune import FinetuneRecipe, build_finetune_encoder

    enc = build_encoder("tiny-cpu")
    state = {"encoder." + k: v for k, v in official_encoder_state(enc).items()}
    state["decoder.0.weight"] = torch.zeros(3072, 128, 1, 1)
    path = tmp_path / "simmim.pth"
    torch.save({"model": state}, path)
    recipe = load_config(
        FinetuneRecipe,
        None,
        [f"init={path}", "encoder.preset=tiny-cpu", "encoder.pretrained_window_sizes=[4,4,4,2]"],
    )
    encoder, info = build_finetune_encoder(recipe)
    assert info["dropped"] == ["decoder.0.weight"]
    assert info["reinitialised"] == ["mask_token"]  # the official file was written without one
