"""Prompt-to-Prompt attention control on a tiny random SD UNet, and the hook that hands it out."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from t2ialign.core.errors import ConfigError, PluginError
from t2ialign.core.host import Host
from t2ialign.plugins.extractors.unet import t2ialign_make_attention_editor
from t2ialign.plugins.extractors.unet_editing import AttentionEditController, EditProcessor
from tests.helpers.tiny_models import cached_tiny_sd, write_registry


@pytest.fixture(scope="module")
def host_and_sd(tmp_path_factory):
    reg = write_registry(tmp_path_factory.mktemp("reg") / "r.yaml", "tiny", "stable_diffusion",
                         model=str(cached_tiny_sd()))
    host = Host(registry_files=[reg])
    return host, host.backbone("tiny")


@pytest.fixture(scope="module")
def backbone(host_and_sd):
    return host_and_sd[1]


def _controller(steps=4, cross=1.0, self_=1.0, pairs=((0, 1),), batch=2, record=False):
    return AttentionEditController(steps=steps, cross_replace_steps=cross, self_replace_steps=self_,
                                   token_map=torch.arange(77), pairs=pairs, batch=batch, record=record)


def _processors(backbone):
    return {name: proc for name, proc in backbone.unet.attn_processors.items()}


# ------------------------------------------------------------------------------------ the hook
def test_the_unet_plugin_answers_for_unet_backbones_only(host_and_sd):
    host, sd = host_and_sd
    assert host.attention_editor(sd) is AttentionEditController
    assert t2ialign_make_attention_editor(backbone=sd) is AttentionEditController
    for kind in ("mmdit", None, "dit"):
        assert t2ialign_make_attention_editor(backbone=SimpleNamespace(name="other", attention_kind=kind)) is None
    assert host.attention_editor(SimpleNamespace(name="other", attention_kind="mmdit")) is None


def test_another_plugin_may_answer_the_hook():
    from t2ialign.core.hookspecs import hookimpl

    class JointEditing:
        @hookimpl
        def t2ialign_make_attention_editor(self, backbone):
            return AttentionEditController if backbone.attention_kind == "mmdit" else None

    host = Host(extra_plugins=[("joint_editing", JointEditing())])
    assert host.attention_editor(SimpleNamespace(name="sd3", attention_kind="mmdit")) is AttentionEditController


# ------------------------------------------------------------------------------------ controller
def test_controller_installs_and_restores_processors_also_on_errors(backbone):
    before = _processors(backbone)
    ctrl = _controller()
    with ctrl.installed(backbone):
        inside = _processors(backbone)
        assert all(isinstance(p, EditProcessor) for p in inside.values())
        assert ctrl.layers == len(before) == 14
    assert _processors(backbone) == before
    with pytest.raises(RuntimeError, match="boom"):
        with ctrl.installed(backbone):
            raise RuntimeError("boom")
    assert _processors(backbone) == before


def test_controller_refuses_a_backbone_that_is_not_a_unet():
    sd3 = SimpleNamespace(name="tiny3", attention_kind="mmdit")
    with pytest.raises(PluginError, match="not supported"):
        with _controller().installed(sd3):
            pass


def test_explicit_attention_without_edits_matches_the_original_processors(backbone):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=gen)
    cond = backbone.encode_text(["a red circle", "a blue star"])
    t = torch.tensor([500.0, 500.0])
    ref = backbone.predict(z, t, cond)
    ctrl = _controller(pairs=())  # explicit path on every layer, nothing replaced
    with ctrl.installed(backbone):
        out = backbone.predict(z, t, cond)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    ctrl = _controller(batch=3)
    with ctrl.installed(backbone), pytest.raises(PluginError, match="batch of 3 rows"):
        backbone.predict(z, t, cond)


def test_reweight_factor_one_is_the_identity_and_other_factors_scale(backbone):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 16, 16, generator=gen)
    cond = backbone.encode_text(["a red circle", "a blue circle"])
    t = torch.tensor([400.0, 400.0])
    ref = backbone.predict(z, t, cond)
    # no replacement at all (both schedules 0): only the reweighting acts, on row 1's token 3
    ident = AttentionEditController(steps=4, cross_replace_steps=0.0, self_replace_steps=0.0,
                                    token_map=torch.arange(77), pairs=((0, 1),), batch=2, reweight={3: 1.0})
    with ident.installed(backbone):
        torch.testing.assert_close(backbone.predict(z, t, cond), ref, rtol=1e-4, atol=1e-5)
    double = AttentionEditController(steps=4, cross_replace_steps=0.0, self_replace_steps=0.0,
                                     token_map=torch.arange(77), pairs=((0, 1),), batch=2, reweight={3: 2.0},
                                     record=True)
    with double.installed(backbone):
        out = backbone.predict(z, t, cond)
    # row 0 (no target of any pair) goes through the explicit path unchanged
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[1], ref[1], atol=1e-4)
    cross = [r for r in double.records if r["kind"] == "cross"]
    assert cross and not [r for r in double.records if r["kind"] == "self"]
    for r in cross:
        torch.testing.assert_close(r["after"][1][..., 3], 2 * r["before"][1][..., 3])
        assert torch.equal(r["after"][1][..., :3], r["before"][1][..., :3])
        assert torch.equal(r["after"][0], r["before"][0])
    with pytest.raises(ConfigError, match="reweight factor"):
        AttentionEditController(steps=4, cross_replace_steps=0.0, self_replace_steps=0.0,
                                token_map=torch.arange(77), pairs=((0, 1),), batch=2, reweight={3: float("nan")})


def test_per_word_replace_schedules():
    """Token 2 is replaced for 1 of 4 steps, every other aligned token for 3 (cross_replace_steps 0.75)."""
    ctrl = AttentionEditController(steps=4, cross_replace_steps=0.75, self_replace_steps=0.0,
                                   token_map=torch.arange(77), pairs=((0, 1),), batch=2,
                                   column_replace_steps={2: 0.25}, record=True)
    probs = torch.softmax(torch.randn(2, 2, 5, 77), dim=-1)
    for step in range(4):
        ctrl.step = step
        assert ctrl.wants("cross", 5) == (step < 3)
        if ctrl.wants("cross", 5):
            out = ctrl.edit("cross", "layer", probs)
            assert torch.equal(out[1][..., 2], probs[0][..., 2] if step < 1 else probs[1][..., 2])
            assert torch.equal(out[1][..., 5], probs[0][..., 5])
