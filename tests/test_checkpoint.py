import json
import shutil

import numpy as np
import pytest
import torch

from common.errors import WeightsNotFoundError
from model.checkpoint import load_pipeline
from model.sampler import LuminaSampler, SamplerConfig

CFG = SamplerConfig(steps=4)


def _released_layout(src, dst):
    """Copy a saved tiny pipeline and rewrite its metadata the way the released
    Alpha-VLLM/Lumina-Image-2.0 folder names things (fast tokenizer class, older diffusers,
    left padding in the tokenizer config)."""
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index["_diffusers_version"] = "0.33.0.dev0"
    index["tokenizer"] = ["transformers", "GemmaTokenizerFast"]
    (dst / "model_index.json").write_text(json.dumps(index))
    tok_cfg = json.loads((dst / "tokenizer" / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "GemmaTokenizerFast"
    tok_cfg["padding_side"] = "left"
    (dst / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return dst


def test_save_load_round_trip_gives_identical_weights_and_images(tiny_pipe, tiny_folder, tiny_sampler):
    loaded = load_pipeline(tiny_folder)
    for name, tensor in tiny_pipe.transformer.state_dict().items():
        assert torch.equal(tensor, loaded.transformer.state_dict()[name]), name
    ours = tiny_sampler.generate("a cat", height=32, width=32, config=CFG, output_type="np").images
    again = (
        LuminaSampler.from_pipeline(loaded)
        .generate("a cat", height=32, width=32, config=CFG, output_type="np")
        .images
    )
    assert np.array_equal(ours, again)


def test_released_folder_layout_loads_unchanged(tiny_folder, tiny_sampler, tmp_path):
    folder = _released_layout(tiny_folder, tmp_path / "Lumina-Image-2.0")
    sampler = LuminaSampler.load(folder)
    assert sampler.tokenizer.padding_side == "right"
    ours = tiny_sampler.generate("a cat", height=32, width=32, config=CFG, output_type="np").images
    theirs = sampler.generate("a cat", height=32, width=32, config=CFG, output_type="np").images
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_hub_id_resolves_from_a_local_hub_cache(tiny_folder, tmp_path):
    """A hub id loads through huggingface_hub's cache layout (what a prior download leaves)."""
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--Alpha-VLLM--Lumina-Image-2.0"
    _released_layout(tiny_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    pipe = load_pipeline("Alpha-VLLM/Lumina-Image-2.0", cache_dir=tmp_path / "hub")
    assert pipe.transformer.config.hidden_size == 64


def test_missing_or_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="model folder not found"):
        load_pipeline(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"no model_index\.json"):
        load_pipeline(tmp_path / "empty")
    with pytest.raises(WeightsNotFoundError, match=r"cannot resolve hub id 'nobody/no-such-model'"):
        load_pipeline("nobody/no-such-model", cache_dir=tmp_path / "hub")


def test_incomplete_folder_is_a_clear_error(tiny_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_folder, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(WeightsNotFoundError, match="cannot load pipeline"):
        load_pipeline(broken)
