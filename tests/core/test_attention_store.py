"""Bounded fused storage: folding q/k factors into explicit maps (core/attention_store.py)."""

from __future__ import annotations

import pytest
import torch

from t2ialign.core.attention_store import AttentionStore, SelfAttentionFactors


def _calls(n_calls: int, rows: int = 2, heads: int = 3, q_n: int = 16, extra_keys: int = 0, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, heads, q_n, d, generator=g), torch.randn(rows, heads, q_n + extra_keys, d, generator=g))
            for _ in range(n_calls)]


def _mean_map(calls, scale: float, q_n: int) -> torch.Tensor:
    q = torch.cat([c[0] for c in calls])
    k = torch.cat([c[1] for c in calls])
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)[..., :q_n].mean(dim=(0, 1))


@pytest.mark.parametrize("extra_keys", [0, 5])
def test_fold_keeps_the_operator_and_frees_the_factors(extra_keys):
    calls = _calls(4, extra_keys=extra_keys)
    f = SelfAttentionFactors("l", scale=0.6, value_keys=16)
    for q, k in calls[:3]:
        f.add(q, k)
    f.fold(block_bytes=3 * 21 * 4 * 5)  # blocks of 5 query rows: the blocking is exercised
    assert f.chunks == [] and f.factor_nbytes == 0 and f.folded_rows == 6
    assert f.nbytes == f.map_nbytes == 16 * 16 * 4
    f.add(*calls[3])  # rows after a fold are kept as factors again, and both parts are used
    v = torch.rand(16, 7)
    assert f.rows == 8
    assert torch.allclose(f.apply(v), _mean_map(calls, 0.6, 16) @ v, atol=1e-6)
    # a fold that leaves no factors still applies
    f.fold()
    assert torch.allclose(f.apply(v), _mean_map(calls, 0.6, 16) @ v, atol=1e-6)


def _store(budget):
    store = AttentionStore(reduce_batch=True, self_maps="fused", factor_budget=budget)
    return store


def test_explicit_budget_bounds_the_store_and_keeps_the_result():
    layers = {"a": _calls(6, q_n=16, seed=1), "b": _calls(6, q_n=9, seed=2)}
    free, bounded = _store(None), _store("explicit")
    for i in range(6):
        for name, calls in layers.items():
            for store in (free, bounded):
                store.add_factors(name, *calls[i], scale=0.5)
            # never above what the explicit path keeps for the layers seen so far
            assert bounded.factor_bytes() <= bounded.factor_budget_bytes()
    assert free.folded_rows() == 0 and bounded.folded_rows() > 0
    assert bounded.factor_budget_bytes() == (16 * 16 + 9 * 9) * 4
    for name, q_n in (("a", 16), ("b", 9)):
        v = torch.rand(q_n, 3)
        expected = free.self_factors[name].apply(v)
        assert torch.allclose(bounded.self_factors[name].apply(v), expected, atol=1e-6)
        assert torch.allclose(expected, _mean_map(layers[name], 0.5, q_n) @ v, atol=1e-6)


def test_auto_budget_is_the_explicit_paths_peak():
    store = _store("auto")
    store.add_factors("a", *_calls(1, rows=3, q_n=16, seed=6)[0], scale=0.5)
    store.add_factors("b", *_calls(1, rows=2, q_n=9, seed=7)[0], scale=0.5)
    maps = (16 * 16 + 9 * 9) * 4
    # kept maps + half of the largest call's float32 head-mean block (rows x Q x Q)
    assert store.factor_budget_bytes() == maps + 3 * 16 * 16 * 4 // 2
    assert store.factor_bytes() <= store.factor_budget_bytes()
    for i in range(20):
        store.add_factors("a", *_calls(1, rows=3, q_n=16, seed=8 + i)[0], scale=0.5)
        assert store.factor_bytes() <= store.factor_budget_bytes()
    assert store.folded_rows() > 0


def test_numeric_budget_folds_the_largest_layer_first():
    store = _store(9_000)  # bytes
    store.add_factors("big", *_calls(1, q_n=16, seed=3)[0], scale=0.5)    # 2 x 3 x 32 x 4 x 4 = 3072 B
    store.add_factors("small", *_calls(1, q_n=4, seed=4)[0], scale=0.5)   # 768 B
    assert store.folded_rows() == 0
    for _ in range(2):
        store.add_factors("big", *_calls(1, q_n=16, seed=5)[0], scale=0.5)
    # 3 x 3072 + 768 > 9000: the big layer is folded (its map is 1024 B), the small one is kept
    assert store.self_factors["big"].chunks == [] and store.self_factors["small"].chunks
    assert store.factor_bytes() <= 9_000
    with pytest.raises(ValueError, match="factor_budget"):
        _store(-1).add_factors("x", *_calls(1)[0], scale=1.0)


def test_pipeline_checks_max_mib():
    from t2ialign.core.errors import ConfigError
    from t2ialign.core.pipeline import _check_factor_budget

    assert _check_factor_budget(None) == "auto"  # the default: never above the explicit path's peak
    assert _check_factor_budget("unbounded") is None
    assert _check_factor_budget("explicit") == "explicit"
    assert _check_factor_budget(1.5) == 3 * 2**19
    for bad in (-1, "lots", float("nan"), True):
        with pytest.raises(ConfigError, match="self_factors.max_mib"):
            _check_factor_budget(bad)


def test_apply_keeps_subnormals_out_of_the_fused_product(monkeypatch):
    """Calibrated maps (``A ** (1/S)``) hold values near 1e-40; in the fused product they make
    float32 subnormals, which stall x86 vector units (the toy model's propagation was ~5x slower). The
    columns run at unit scale with negligible entries zeroed, and the result is unchanged."""
    import t2ialign.core.attention_store as store_mod

    calls = _calls(2, q_n=16)
    f = SelfAttentionFactors("l", scale=0.6, value_keys=16)
    for q, k in calls:
        f.add(q, k)
    g = torch.Generator().manual_seed(1)
    v = torch.rand(16, 3, generator=g) ** 30  # entries down to ~1e-40, like A ** (1/S) with S = 1/30
    v[:, 1] *= 1e-30  # a column of small scale keeps its own relative precision
    v[:, 2] = 0.0  # an all-zero column stays zero
    tiny = torch.finfo(torch.float32).tiny
    assert ((v > 0) & (v < tiny)).any()  # the input does hold subnormals

    seen = []
    real_sdpa = store_mod.F.scaled_dot_product_attention

    def spy(q, k, value, **kw):
        seen.append(value.detach().clone())
        return real_sdpa(q, k, value, **kw)

    monkeypatch.setattr(store_mod.F, "scaled_dot_product_attention", spy)
    out = f.apply(v)
    assert seen and all(not ((s != 0) & (s.abs() < tiny)).any() for s in seen)
    expected = _mean_map(calls, 0.6, 16).double() @ v.double()
    for col in range(2):
        assert torch.allclose(out[:, col].double(), expected[:, col], rtol=1e-5, atol=1e-6 * float(expected[:, col].abs().max()))
    assert (out[:, 2] == 0).all()
