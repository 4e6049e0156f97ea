"""Layer aggregation of cross/self attention (method-spec §6.4, §7.2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from t2ialign.core.aggregation import (
    SelfPropagation,
    aggregate_cross,
    aggregate_self,
    cross_layer_weights,
    key_adjoint,
    needed_layers,
    propagate,
    self_layer_weights,
    self_steps,
    self_to_output_grid,
)
from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.protocols import LayerInfo


def _layers(spec: list[tuple[str, str, int]]) -> list[LayerInfo]:
    """(kind, place, grid side) in forward order -> LayerInfo with groups/depths like a backbone."""
    out, state = [], {}
    for i, (kind, place, side) in enumerate(spec):
        st = state.setdefault(kind, {"depth": 0, "group": -1, "grid": None})
        if st["grid"] != side:
            st["group"] += 1
            st["grid"] = side
        out.append(LayerInfo(f"{kind}{i}", kind, (side, side), st["group"], st["depth"], place))
        st["depth"] += 1
    return out


def sd15_cross_layers() -> list[LayerInfo]:
    """SD 1.5's 16 cross layers: down 64x2, 32x2, 16x2, mid 8, up 16x3, 32x3, 64x3."""
    spec = ([("cross", "down", 64)] * 2 + [("cross", "down", 32)] * 2 + [("cross", "down", 16)] * 2
            + [("cross", "mid", 8)] + [("cross", "up", 16)] * 3 + [("cross", "up", 32)] * 3
            + [("cross", "up", 64)] * 3)
    return _layers(spec)


def test_gaussian_weights_match_the_reference_numbers():
    # method-spec §6.4: SD1.5 normalised weights with sigma 3, centred on the mid layer (6)
    w = cross_layer_weights(sd15_cross_layers(), group_weights=None, gaussian_sigma=3.0)
    expected = [.018, .034, .056, .082, .108, .128, .135, .128, .108, .082, .056, .034, .018, .009, .004, .002]
    assert torch.allclose(w, torch.tensor(expected), atol=1.5e-3)
    assert int(w.argmax()) == 6
    assert w.sum().item() == pytest.approx(1.0)


def test_gaussian_centre_without_down_or_mid_layers():
    layers = _layers([("joint", "block", 8)] * 24)
    w = cross_layer_weights(layers, group_weights=None, gaussian_sigma=3.0)
    # centred at (L-1)/2 = 11.5: symmetric around it
    assert torch.allclose(w, w.flip(0))
    assert w[11] == w[12] and w[11] > w[10]


def test_group_weights_per_resolution_group():
    layers = sd15_cross_layers()
    w = cross_layer_weights(layers, group_weights=[1, 1, 10, 15, 10, 1, 1], gaussian_sigma=0.0)
    raw = torch.tensor([1, 1, 1, 1, 10, 10, 15, 10, 10, 10, 1, 1, 1, 1, 1, 1], dtype=torch.float)
    assert torch.allclose(w, raw / raw.sum())


def test_group_weights_length_must_match_groups():
    with pytest.raises(ConfigError) as info:
        cross_layer_weights(sd15_cross_layers(), group_weights=[1, 1, 1], gaussian_sigma=0.0)
    assert "7 cross-attention resolution groups" in str(info.value)
    assert "64x64" in str(info.value)


def test_self_layers_get_zero_cross_weight_and_are_not_needed():
    layers = _layers([("self", "down", 8), ("cross", "down", 8), ("self", "up", 8), ("cross", "up", 8)])
    w = cross_layer_weights(layers, group_weights=[2.0], gaussian_sigma=0.0)
    assert w.tolist() == [0.0, 0.5, 0.0, 0.5]
    assert needed_layers(layers, w) == ["cross1", "cross3"]


def test_zero_weight_groups_are_not_needed():
    w = cross_layer_weights(sd15_cross_layers(), group_weights=[0, 0, 1, 1, 1, 0, 0], gaussian_sigma=0.0)
    names = needed_layers(sd15_cross_layers(), w)
    assert len(names) == 6  # down16 (2) + mid8 (1) + up16 (3)
    assert names == [l.name for l in sd15_cross_layers() if l.group in (2, 3, 4)]


def test_aggregate_cross_is_the_weighted_mean_of_upsampled_maps():
    layers = _layers([("cross", "down", 4), ("cross", "mid", 2), ("cross", "up", 4)])
    torch.manual_seed(0)
    maps = {l.name: torch.rand(l.grid[0] * l.grid[1], 3) for l in layers}
    w = torch.tensor([0.2, 0.5, 0.3])
    out = aggregate_cross(maps, layers, w, (4, 4))
    assert out.shape == (3, 4, 4)
    # independent computation per token column
    expected = torch.zeros(3, 4, 4)
    for l, wi in zip(layers, w):
        img = maps[l.name].t().reshape(3, 1, *l.grid)
        img = F.interpolate(img, size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
        expected += wi * img
    assert torch.allclose(out, expected / w.sum(), atol=1e-6)
    # a batch dimension is carried through
    batched = {k: torch.stack([v, 2 * v]) for k, v in maps.items()}
    out_b = aggregate_cross(batched, layers, w, (4, 4))
    assert out_b.shape == (2, 3, 4, 4) and torch.allclose(out_b[1], 2 * out, atol=1e-6)


def test_aggregate_cross_missing_layer():
    layers = _layers([("cross", "down", 4), ("cross", "up", 4)])
    with pytest.raises(InputError, match="cross1"):
        aggregate_cross({"cross0": torch.rand(16, 2)}, layers, torch.tensor([0.5, 0.5]), (4, 4))
    # a zero-weight layer need not be captured
    out = aggregate_cross({"cross0": torch.rand(16, 2)}, layers, torch.tensor([1.0, 0.0]), (4, 4))
    assert out.shape == (2, 4, 4)


def test_self_map_upsampling_convention():
    # a 2x2 grid self map on a 4x4 output: query rows nearest-repeated, key columns bilinear
    torch.manual_seed(1)
    m = torch.softmax(torch.rand(4, 4), dim=-1)
    big = self_to_output_grid(m, (2, 2), (4, 4))
    assert big.shape == (16, 16)
    for qy in range(4):
        for qx in range(4):
            src = (qy // 2) * 2 + (qx // 2)  # nearest source query pixel
            keys = F.interpolate(m[src].reshape(1, 1, 2, 2), size=(4, 4), mode="bilinear", align_corners=False)
            assert torch.allclose(big[qy * 4 + qx], keys.flatten(), atol=1e-6)
    # same grid: unchanged
    assert torch.equal(self_to_output_grid(m, (2, 2), (2, 2)), m)


def test_aggregate_self_rows_and_chain_order():
    layers = _layers([("self", "down", 2), ("self", "mid", 1), ("self", "up", 2), ("self", "up", 2)])
    torch.manual_seed(2)
    maps = {l.name: torch.softmax(torch.rand(l.grid[0] ** 2, l.grid[0] ** 2), -1) for l in layers}
    rows = [[1, 0, 1], [0, 0, 1]]
    K = aggregate_self(maps, layers, rows, (2, 2))
    k0 = (maps["self0"] + maps["self2"] + maps["self3"]) / 3
    k1 = (maps["self2"] + maps["self3"]) / 2
    assert torch.allclose(K, k1 @ k0, atol=1e-6)
    assert not torch.allclose(K, k0 @ k1, atol=1e-4)  # order matters: K = K_1 K_0
    # row-stochastic inputs on one grid give a row-stochastic operator
    assert torch.allclose(K.sum(-1), torch.ones(4), atol=1e-5)


def test_all_zero_self_row_is_a_config_error():
    layers = _layers([("self", "down", 4), ("self", "mid", 2), ("self", "up", 4)])
    with pytest.raises(ConfigError) as info:
        self_layer_weights(layers, [[1, 0, 1], [0, 0, 0]])
    msg = str(info.value)
    assert "row 1" in msg and "group 0: 4x4" in msg and "group 2: 4x4" in msg
    with pytest.raises(ConfigError, match="3 self-attention resolution groups"):
        self_layer_weights(layers, [[1, 0, 0, 0, 0, 0, 1]])


def test_needed_self_layers_from_rows():
    layers = _layers([("self", "down", 4), ("cross", "down", 4), ("self", "mid", 2), ("self", "up", 4)])
    rows = self_layer_weights(layers, [[1, 0, 1], [0, 0, 1]])
    assert needed_layers(layers, rows) == ["self0", "self3"]


def test_propagate_is_a_matrix_product_per_class():
    torch.manual_seed(3)
    K = torch.rand(9, 9)
    maps = torch.rand(2, 3, 3)
    out = propagate(K, maps)
    for c in range(2):
        assert torch.allclose(out[c].flatten(), K @ maps[c].flatten(), atol=1e-6)
    # identity operator leaves maps unchanged
    assert torch.allclose(propagate(torch.eye(9), maps), maps)
    with pytest.raises(InputError, match="same out_grid"):
        propagate(torch.eye(4), maps)


def test_propagating_the_steps_equals_propagating_their_product():
    layers = _layers([("self", "down", 2), ("self", "mid", 1), ("self", "up", 2), ("self", "up", 2)])
    torch.manual_seed(4)
    maps = {l.name: torch.softmax(torch.rand(l.grid[0] ** 2, l.grid[0] ** 2), -1) for l in layers}
    rows = [[1, 0, 1], [0, 0, 1]]
    steps = self_steps(maps, layers, rows, (2, 2))
    assert len(steps) == 2
    heat = torch.rand(3, 2, 2)
    expected = propagate(aggregate_self(maps, layers, rows, (2, 2)), heat)
    assert torch.allclose(propagate(steps, heat), expected, atol=1e-6)
    # applied K_0 first: the reversed order gives another result
    assert not torch.allclose(propagate(steps[::-1], heat), expected, atol=1e-4)
    with pytest.raises(InputError, match="same out_grid"):
        propagate([steps[0], torch.eye(9)], heat)


# ---------------------------------------------------------------- fused propagation
def _factors(name, grid, rows=3, heads=2, d=4, extra_keys=0, seed=0, scale=0.7):
    """Random q/k factors of one layer and the explicit head/row-mean map they stand for."""
    from t2ialign.core.attention_store import SelfAttentionFactors

    g = torch.Generator().manual_seed(seed)
    q_n = grid[0] * grid[1]
    f = SelfAttentionFactors(name, scale=scale, value_keys=q_n)
    q = torch.randn(rows, heads, q_n, d, generator=g)
    k = torch.randn(rows, heads, q_n + extra_keys, d, generator=g)
    f.add(q[:1], k[:1])  # two calls of different batch sizes
    f.add(q[1:], k[1:])
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)[..., :q_n]  # not renormalised
    return f, probs.mean(dim=(0, 1))


def test_factors_apply_equals_mean_map_times_values():
    f, m = _factors("l", (3, 3), extra_keys=5)
    v = torch.rand(9, 6)
    assert torch.allclose(f.apply(v), m @ v, atol=1e-6)
    assert f.rows == 3 and f.heads == 2 and f.queries == 9
    assert f.nbytes == 3 * 2 * (9 + 14) * 4 * 4
    # more value columns than the head dim run in several SDPA calls
    wide = torch.rand(9, 11)
    assert torch.allclose(f.apply(wide), m @ wide, atol=1e-6)
    with pytest.raises(ValueError, match="value keys"):
        f.apply(torch.rand(8, 2))


def test_fused_propagation_equals_explicit_steps_across_grids():
    layers = _layers([("self", "down", 4), ("self", "mid", 2), ("self", "up", 4), ("self", "up", 4)])
    ops, maps = {}, {}
    for i, layer in enumerate(layers):
        ops[layer.name], maps[layer.name] = _factors(layer.name, layer.grid, seed=i, extra_keys=i)
    rows = [[1, 1, 1], [0, 1, 2]]
    heat = torch.rand(4, 4, 4)
    expected = propagate(self_steps(maps, layers, rows, (4, 4)), heat)
    fused = SelfPropagation(ops, layers, rows, (4, 4))
    assert torch.allclose(propagate(fused, heat), expected, atol=1e-6)
    # a non-square output grid larger than every layer grid
    wide = torch.rand(2, 8, 6)
    expected = propagate(self_steps(maps, layers, rows, (8, 6)), wide)
    assert torch.allclose(SelfPropagation(ops, layers, rows, (8, 6))(wide), expected, atol=1e-6)


def test_key_adjoint_is_the_transpose_of_the_bilinear_upsampling():
    torch.manual_seed(5)
    x = torch.rand(2, 7, 5)
    z = torch.rand(2, 3, 2)
    up = F.interpolate(z[None], size=(7, 5), mode="bilinear", align_corners=False)[0]
    # <U z, x> == <z, U^T x>
    assert torch.allclose((up * x).sum(), (z * key_adjoint(x, (3, 2))).sum(), atol=1e-5)
    assert torch.equal(key_adjoint(x, (7, 5)), x)


def test_fused_propagation_refuses_missing_or_mismatched_factors():
    layers = _layers([("self", "down", 4), ("self", "up", 4)])
    f0, _ = _factors("self0", (4, 4))
    with pytest.raises(InputError, match="self1"):
        SelfPropagation({"self0": f0}, layers, [[1]], (4, 4))
    f1, _ = _factors("self1", (2, 2))
    with pytest.raises(InputError, match="grid 4x4 needs 16"):
        SelfPropagation({"self0": f0, "self1": f1}, layers, [[1]], (4, 4))
