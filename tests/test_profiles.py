import pytest
import torch

from common.errors import ConfigError
from model.checkpoint import build_transformer
from model.params import count_transformer_params
from model.profiles import PROFILES, get_profile


def test_full_profile_matches_paper_parameter_count():
    full = get_profile("full")
    assert (full.transformer.hidden_size, full.transformer.num_layers) == (2304, 26)
    assert (full.transformer.num_attention_heads, full.transformer.num_kv_heads) == (24, 8)
    assert count_transformer_params(full) == 2_609_769_152


def test_small_profile_is_40_to_50m():
    assert 40e6 <= count_transformer_params(get_profile("small")) <= 50e6


def test_tiny_is_much_smaller_than_small():
    assert count_transformer_params(get_profile("tiny")) < 1e6


def test_rope_axes_match_head_dim():
    for profile in PROFILES.values():
        spec = profile.transformer
        assert sum(spec.axes_dim_rope) == spec.hidden_size // spec.num_attention_heads


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown model profile 'huge'.*tiny, small, full"):
        get_profile("huge")


def test_zero_init_makes_blocks_identity_and_output_zero():
    tr = build_transformer(get_profile("tiny"), zero_init=True)
    for block in [*tr.noise_refiner, *tr.layers]:
        assert torch.count_nonzero(block.norm1.linear.weight) == 0
    x = torch.randn(1, 16, 8, 8)
    caps = torch.randn(1, 4, 64)
    out = tr(x, torch.tensor([0.3]), caps, torch.ones(1, 4, dtype=torch.long)).sample
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_build_is_deterministic_per_seed():
    a = build_transformer(get_profile("tiny"), seed=3, zero_init=False).state_dict()
    b = build_transformer(get_profile("tiny"), seed=3, zero_init=False).state_dict()
    c = build_transformer(get_profile("tiny"), seed=4, zero_init=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
