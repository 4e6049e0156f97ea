"""Compositional generation on a tiny SD model: the phrase weighting by hand, seeds, task outputs and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from t2ialign.core.cli import main
from t2ialign.core.errors import ConfigError, InputError
from t2ialign.core.host import Host
from t2ialign.core.sampling import sample
from t2ialign.plugins.tasks import generation as gen
from tests.helpers.tiny_clip import ARCH, tiny_clip_checkpoint
from tests.helpers.tiny_models import cached_tiny_sd

PROMPT = "a red star and a blue circle"
PHRASES = ["a red star", "a blue circle"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    _, ckpt = tiny_clip_checkpoint(folder / "clip")
    reg = folder / "reg.yaml"
    reg.write_text(yaml.safe_dump({
        "backbones": {"tiny": {"plugin": "stable_diffusion", "model": str(cached_tiny_sd())}},
        "datasets": {"toy_prompts": {"plugin": "toy_prompts", "n": 20}},
        "metrics": {"clip_tiny": {"plugin": "clip_score", "model": ARCH, "pretrained": str(ckpt)},
                    "toy_oracle": {"plugin": "toy_oracle"}},
        "tasks": {"generation": {"plugin": "generation"}},
        "phrases": {"rules": {"plugin": "rules"}},
    }))
    return reg


@pytest.fixture(scope="module")
def host(registry):
    return Host(registry_files=[registry])


@pytest.fixture(scope="module")
def sd(host):
    return host.backbone("tiny")


def test_phrase_weights_formula():
    w = gen.phrase_weights(torch.tensor([0.2, 0.5, 0.4]), 1.2)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.2, 1.2 ** (2 / 3)], dtype=torch.float64))
    assert torch.equal(gen.phrase_weights(torch.tensor([0.3, 0.3]), 1.2), torch.ones(2, dtype=torch.float64))


def test_reweighting_changes_exactly_the_phrase_tokens(sd):
    cond, empty = sd.encode_text([PROMPT]), sd.encode_text([""])
    spans = [sd.token_spans(PROMPT, p) for p in PHRASES]
    assert spans == [[1, 2, 3], [5, 6, 7]]  # BOS, a red star, and, a blue circle
    new = gen.reweight_embeddings(cond, empty, spans, [1.2, 1.05])
    e, e0, out = cond.embeds[0], empty.embeds[0], new.embeds[0]
    for span, w in zip(spans, [1.2, 1.05]):
        for pos in span:
            torch.testing.assert_close(out[pos], e0[pos] + w * (e[pos] - e0[pos]))
            assert not torch.equal(out[pos], e[pos])
    others = [i for i in range(e.shape[0]) if i not in spans[0] + spans[1]]
    assert torch.equal(out[others], e[others])
    assert torch.equal(cond.embeds[0], e)  # the input is not modified in place


def test_weighting_step_by_hand(sd):
    wt = gen.PhraseWeighting(sd, PROMPT, PHRASES, strength=1.2, elbo_steps=3)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = wt(0, 999, z)
    t = torch.tensor([999.0])
    e_prompt = sd.predict(z, t, sd.encode_text([PROMPT]))
    d = [((e_prompt - sd.predict(z, t, sd.encode_text([p]))) ** 2).mean().item() for p in PHRASES]
    assert wt.log[0]["d"] == pytest.approx(d, rel=1e-4)
    w = wt.log[0]["w"]
    assert all(1.0 <= x <= 1.2 + 1e-12 for x in w) and sorted(w) == pytest.approx([1.0, 1.2])
    assert w[int(np.argmax(d))] == pytest.approx(1.2)  # the least represented phrase gets the boost
    expected = gen.reweight_embeddings(sd.encode_text([PROMPT]), sd.encode_text([""]), wt.spans, w)
    torch.testing.assert_close(cond.embeds, expected.embeds)
    # after elbo_steps the prompt's own embedding is used; one phrase -> no weighting
    assert torch.equal(wt(3, 939, z).embeds, sd.encode_text([PROMPT]).embeds) and len(wt.log) == 1
    single = gen.PhraseWeighting(sd, PROMPT, PHRASES[:1])
    assert not single.active and torch.equal(single(0, 999, z).embeds, single.cond.embeds)
    with pytest.raises(ConfigError, match="strength"):
        gen.PhraseWeighting(sd, PROMPT, PHRASES, strength=0.5)


def test_pair_shares_the_seed_and_baseline_is_plain_sampling(sd):
    pair = gen.generate_pair(sd, PROMPT, PHRASES, seed=7, steps=3, guidance=7.5, strength=1.2)
    plain, _ = sample(sd, PROMPT, steps=3, guidance=7.5, seed=7)
    assert np.array_equal(pair.baseline, plain)
    again = gen.generate_pair(sd, PROMPT, PHRASES, seed=7, steps=3, guidance=7.5, strength=1.2)
    assert np.array_equal(again.baseline, pair.baseline) and np.array_equal(again.weighted, pair.weighted)
    assert pair.weighting.summary()["steps_weighted"] == 3
    # strength 1 is the baseline exactly: the weighting is the only difference between the two
    same = gen.generate_pair(sd, PROMPT, PHRASES, seed=7, steps=3, strength=1.0)
    assert np.array_equal(same.weighted, same.baseline)


def test_backbone_without_decoder_is_refused():
    class MMDiTLike:
        name = "sd3-like"
        attention_kind = "mmdit"

    with pytest.raises(InputError, match="generation is not supported"):
        gen.check_can_generate(MMDiTLike())


def _config(tmp_path, **over):
    config = {**gen.DEFAULTS, "backbone": "tiny", "dataset": "toy_prompts", "limit": 3, "steps": 2,
              "clip_metric": "clip_tiny", "phrase_extractor": "rules", "output": str(tmp_path / "run")}
    config["phrases"] = {}
    config.update(over)
    return config


def test_task_outputs_and_resume(host, tmp_path):
    task = host.task("generation")
    config = _config(tmp_path)
    res = task.run(config, host)
    out = tmp_path / "run"
    assert res["prompts"] == 3 and not res["failed_prompts"] and res["oracle"] == "toy_oracle"
    for v in ("baseline", "weighted"):
        c = res["variants"][v]["clip_score"]
        assert c["prompts"] == 3 and c["ci95_low"] <= c["mean"] <= c["ci95_high"]
        assert 0.0 <= res["variants"][v]["oracle"]["object_accuracy"] <= 1.0
    records = [json.loads(x) for x in (out / "records.rank0.jsonl").read_text().splitlines()]
    assert len(records) == 3
    diffs = [np.mean(r["clip"]["weighted"]) - np.mean(r["clip"]["baseline"]) for r in records]
    assert res["differences_weighted_minus_baseline"]["clip_score"]["delta"] == pytest.approx(np.mean(diffs))
    for r in records:
        assert r["phrases"] == [p for p in r["phrases"] if p in r["prompt"]] and len(r["phrases"]) >= 2
        assert r["weights"][0]["steps_weighted"] == 2
        assert all(1.0 <= m <= 1.2 for m in r["weights"][0]["mean"])
        for v in ("baseline", "weighted"):
            assert (out / r["images"][v][0]).is_file()
        assert (out / r["grid"]).is_file()
    for name in ("results.json", "report.html", "config.yaml"):
        assert (out / name).is_file()
    # same seed for every prompt => the baseline PNG of prompt 0 is plain seeded sampling
    from t2ialign.core.images import load_rgb

    plain, _ = sample(host.backbone("tiny"), records[0]["prompt"], steps=2, guidance=7.5, seed=4307)
    assert np.array_equal(load_rgb(out / records[0]["images"]["baseline"][0]), plain)

    # resume: a finished run adds nothing; a lost record is regenerated alone
    path = out / "records.rank0.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # record 3 lost mid-write
    again = task.run(config, host)
    new = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["id"] for r in new] == [r["id"] for r in records]
    assert new[2]["clip"] == records[2]["clip"]
    assert again["variants"] == res["variants"]
    with pytest.raises(ConfigError, match="strength"):
        task.run({**config, "strength": 1.5}, host)


def test_cli_generate_and_eval(registry, tmp_path, capsys):
    out = tmp_path / "one"
    rc = main(["--registry", str(registry), "generate", PROMPT, "--backbone", "tiny", "--steps", "2",
               "--phrases", "red star", "blue circle", "--output", str(out)])
    assert rc == 0
    for name in ("baseline.png", "weighted.png", "side_by_side.png", "generate.json"):
        assert (out / name).is_file()
    info = json.loads((out / "generate.json").read_text())
    assert info["phrases"] == ["red star", "blue circle"] and info["spans"] == [[2, 3], [6, 7]]
    assert info["weights"]["steps_weighted"] == 2
    rc = main(["--registry", str(registry), "eval", "generation", "--backbone", "tiny", "--dataset", "toy_prompts",
               "--n", "1", "--output", str(tmp_path / "ev"), "steps=1", "clip_metric=null"])
    assert rc == 0
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["prompts"] == 1
    assert "oracle" in capsys.readouterr().out
    rc = main(["--registry", str(registry), "generate", PROMPT, "--backbone", "tiny", "--steps", "1",
               "--phrases", "a green cube", "--output", str(tmp_path / "bad")])
    assert rc == InputError.exit_code
