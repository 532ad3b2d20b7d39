"""VISUAL_METHOD / VISUAL_BUDGET: names decide the method, tags keep settings apart, bad requests
name the setting and what is accepted, and the sweep plans one run per method x budget."""

from __future__ import annotations

import json

import pytest

from hybrid_vlm import HybridConfig
from hybrid_vlm.config import method_settings
from vlmeval_plugin import settings


@pytest.mark.parametrize(
    "name,env,expected",
    [
        ("llava_v1.5_7b_visionzip", {}, dict(visual_method="visionzip", visual_budget=64)),
        ("llava_v1.5_7b_divprune", {"VISUAL_BUDGET": "192"}, dict(visual_method="divprune", visual_budget=192)),
        ("llava_v1.5_7b_divprune", {}, dict(visual_budget=56)),  # DivPrune's default ratio 0.098 of 576
        ("llava_v1.5_7b_vispruner", {"VISUAL_METHOD": "vispruner", "VISUAL_BUDGET": "128"}, dict(visual_method="vispruner", visual_budget=128)),
        ("llava_v1.5_7b_fastv", {"VISUAL_METHOD": "fastv", "VISUAL_BUDGET": "64"}, dict(fastv_k=64, fastv_select="attention")),
        ("llava_v1.5_7b_fastv", {"VISUAL_BUDGET": "64"}, dict(fastv_k=64)),
        ("llava_v1.5_7b_fastv", {"FASTV_K": "72"}, dict(fastv_k=72)),  # FASTV_K keeps working
        ("llava_v1.5_7b_random", {"VISUAL_BUDGET": "64", "SELECT_SEED": "3"}, dict(fastv_k=64, fastv_select="random", select_seed=3)),
        ("llava_v1.5_7b_random", {}, dict(fastv_k=0.5, fastv_select="random")),
        ("llava_v1.5_7b_fastv", {"VISUAL_BUDGET": "64", "FASTV_SELECT": "random"}, dict(fastv_k=64, fastv_select="random")),
        ("llava_next_vicuna_7b_random", {"VISUAL_BUDGET": "64", "FASTV_NEWLINES": "keep"}, dict(fastv_k=64, fastv_newlines="keep")),
        ("llava_next_vicuna_7b_visionzip", {"VISUAL_BUDGET": "640"}, dict(visual_method="visionzip", visual_budget=640)),
        ("llava_next_vicuna_7b_vispruner", {"VISUAL_BUDGET": "32", "VISUAL_BUDGET_SCOPE": "crop"}, dict(visual_budget=32, budget_scope="crop")),
        ("llava_next_vicuna_7b_divprune", {"VISUAL_BUDGET_SCOPE": "crop"}, dict(budget_scope="image")),  # not read: official DivPrune is per image
        ("llava_v1.5_7b_visionzip", {"VISUAL_BUDGET_SCOPE": "crop"}, dict(budget_scope="image")),  # one grid per image: not read
        ("llava_v1.5_7b_pool", {"VISUAL_BUDGET": "192"}, dict(visual_method="pool", visual_budget=192, visual_pool=None)),
        ("llava_v1.5_7b_pool", {}, dict(visual_pool=2, visual_method=None)),
        ("llava_tiny_visionzip", {"VISUAL_BUDGET": "128", "HYBRID_POSITIONS": "renumbered"}, dict(visual_budget=128, position_mode="renumbered")),
        ("llava_v1.5_7b_fastv", {"FASTV_K": "64", "MASK_READ": "once"}, dict(fastv_k=64, mask_read="once")),
        ("llava_v1.5_7b_dart", {"MASK_READ": "once"}, dict(visual_method="dart", mask_read="once")),
        ("llava_v1.5_7b_fastv", {}, dict(mask_read="never")),
    ],
)
def test_names_decide_the_method(name, env, expected):
    config = settings.hybrid_config_for(name, env)
    for field, value in expected.items():
        assert getattr(config, field) == value, field


@pytest.mark.parametrize(
    "name,env,message",
    [
        ("llava_v1.5_7b_visionzip", {"VISUAL_METHOD": "divprune"}, "VISUAL_METHOD=divprune conflicts with the name"),
        ("llava_v1.5_7b_fastv", {"VISUAL_METHOD": "visionzip"}, "conflicts with the name"),
        ("llava_v1.5_7b", {"VISUAL_METHOD": "fastv"}, "conflicts with the name"),
        ("llava_v1.5_7b_dymu", {"VISUAL_BUDGET": "64", "DYMU_THRESHOLDS": "x.json"}, "VISUAL_BUDGET does not apply to this name"),
        ("llava_v1.5_7b_fastv", {"VISUAL_BUDGET": "64", "FASTV_K": "32"}, "conflicts with FASTV_K=32"),
        ("llava_v1.5_7b_visionzip", {"VISUAL_BUDGET": "x"}, "VISUAL_BUDGET='x' is not valid"),
        ("llava_v1.5_7b_fastv", {"VISUAL_METHOD": "fastv", "VISUAL_BUDGET": "64", "FASTV_SELECT": "random"}, "conflicts with FASTV_SELECT=random"),
        ("llava_v1.5_7b_pool", {"VISUAL_BUDGET": "193"}, "not reachable by pool: .* nearby reachable budgets: .*192"),
        ("llava_v1.5_7b_divprune", {"VISUAL_BUDGET": "600"}, "not reachable by divprune: use an integer 1..576"),
        ("llava_v1.5_7b_fastv", {"MASK_READ": "always"}, "MASK_READ='always' is not valid: use never .* or once"),
        ("llava_v1.5_7b_fastv", {"VISUAL_METHOD": "foo"}, "VISUAL_METHOD=foo is not a method \\(one of fastv, .*visionzip.*\\); the name decides"),
        ("llava_v1.5_7b_fastv", {"FASTV_K": "577"}, "FASTV_K=577 would keep more than LLaVA-1.5's 576 visual tokens, so nothing is pruned"),
        ("llava_v1.5_7b_random", {"FASTV_K": "600"}, "FASTV_K=600 would keep more than"),
        ("llava_v1.5_7b_pool", {"VISUAL_BUDGET": "144", "FASTV_K": "600"}, "FASTV_K=600 would keep more than"),
        ("llava_v1.5_7b_pool", {"VISUAL_BUDGET": "144", "FASTV_K": "200"}, "FASTV_K=200 would keep all of the at most 144 visual tokens"),
        ("llava_v1.5_7b_pool", {"VISUAL_BUDGET": "144", "FASTV_K": "144"}, "FASTV_K=144 would keep all of the at most 144 visual tokens"),
    ],
)
def test_conflicting_or_malformed_settings_are_refused(name, env, message):
    with pytest.raises(settings.PluginError, match=message):
        settings.hybrid_config_for(name, env)


@pytest.mark.parametrize(
    "env,message",
    [
        ({"VISUAL_METHOD": "zip", "VISUAL_BUDGET": "64"}, "VISUAL_METHOD='zip' is not valid: use one of fastv, random, pool, visionzip"),
        ({"VISUAL_BUDGET": "64"}, "VISUAL_BUDGET=64 needs VISUAL_METHOD"),
        ({"VISUAL_METHOD": "divprune"}, "VISUAL_METHOD=divprune needs VISUAL_BUDGET"),
        ({"VISUAL_METHOD": "dymu", "VISUAL_BUDGET": "64"}, "VISUAL_BUDGET does not apply to VISUAL_METHOD=dymu"),
        ({"VISUAL_METHOD": "visionzip", "VISUAL_BUDGET": "64", "DYMU_THRESHOLDS": "x.json"}, "cannot follow DyMU"),
        ({"VISUAL_METHOD": "visionzip", "VISUAL_BUDGET": "64", "VISUAL_POOL": "2"}, "cannot be combined"),
        # a valid share whose FASTV_K rounds to 1.0: the refusal named FASTV_K, which the user never set
        ({"VISUAL_METHOD": "random", "VISUAL_BUDGET": "0.0000000001"}, r"VISUAL_BUDGET=1e-10 is too small a share for fastv and random"),
    ],
)
def test_engine_settings_name_what_is_accepted(env, message):
    with pytest.raises(ValueError, match=message):
        HybridConfig.from_env(env)


def test_tags_carry_method_budget_positions_and_seed():
    tags = {
        HybridConfig(visual_method=m, visual_budget=b, position_mode=p).describe()
        for m in ("visionzip", "vispruner", "divprune", "pool") for b in (64, 128) for p in ("logical", "renumbered")
    }
    assert len(tags) == 16
    assert HybridConfig(visual_method="visionzip", visual_budget=64).describe() == "visionzip-b64"
    assert HybridConfig(fastv_k=64, fastv_select="random", select_seed=2).describe() == "random-k64-l2-s2"
    assert HybridConfig(fastv_k=64, mask_read="once").describe() == "fastv-k64-l2_mask-read-once"
    # a FASTV_K fraction keeps every digit (6 significant digits gave 0.1234567 and 0.1234568 one folder)
    assert HybridConfig(fastv_k=0.5).describe() == "fastv-r0.5-l2"
    assert HybridConfig(fastv_k=0.1234567).describe() == "fastv-r0.1234567-l2" != HybridConfig(fastv_k=0.1234568).describe()
    assert HybridConfig(mask_read="once").describe() == "vanilla_mask-read-once"
    assert method_settings({}, None) == {}


def test_sweep_plans_one_run_per_method_and_budget(capsys):
    from hybrid_tools import sweep

    methods = ["fastv", "visionzip", "vispruner", "divprune", "random", "pool"]
    assert sweep.main(["--data", "TinyMMBench", "--model", "llava_tiny", "--methods", *methods, "--budgets", "192", "128", "64", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "19 run(s)" in out  # the vanilla reference + 6 methods x 3 budgets
    for method in ("visionzip", "vispruner", "divprune", "pool"):
        for budget in (192, 128, 64):
            assert f"llava_tiny_{method}__{method}-b{budget}" in out
    assert "llava_tiny_fastv__fastv-k64-l2" in out and "llava_tiny_random__random-k64-l2" in out


def test_sweep_refuses_an_unreachable_budget_before_running(capsys):
    from hybrid_tools import sweep

    assert sweep.main(["--data", "TinyMMBench", "--model", "llava_tiny", "--methods", "visionzip", "--budgets", "0", "--dry-run"]) == 2
    assert "--budgets 0" in capsys.readouterr().err


# a valid value of each setting a name may read (VISUAL_BUDGET aside: where unread it is refused)
SETTING_VALUES = {
    "FASTV_K": "32", "FASTV_LAYER": "3", "FASTV_SELECT": "random", "SELECT_SEED": "5", "FASTV_NEWLINES": "keep",
    "VISUAL_POOL": "3", "DYMU_SPLIT": "slot", "HYBRID_POSITIONS": "renumbered", "MASK_READ": "once",
    "DART_QUOTA": "matched", "DART_PIVOTS": "official", "VISUAL_BUDGET_SCOPE": "crop",
}


def outcome(name: str, env: dict):
    try:
        return settings.hybrid_config_for(name, env)
    except settings.PluginError as error:
        return f"refused: {error}"


@pytest.mark.parametrize("name", [name for name in settings.VARIANTS if not name.startswith("llava_tiny")] + ["llava_tiny_dymu", "llava_tiny_pdrop"])
def test_a_setting_reported_ignored_changes_nothing_and_a_read_one_does(name, tmp_path):
    """run.py prints the settings a name ignores (`ignored_settings`): each must leave the name's
    setting as it was, and each one it does not report must change the setting or be refused."""
    thresholds, other_thresholds = tmp_path / "thresholds.json", tmp_path / "other.json"
    for path in (thresholds, other_thresholds):  # well-formed (checked before loading); their model is checked at load
        path.write_text(json.dumps({"format": "hybrid-vlm/dymu-thresholds/v2", "split": "official", "model": {}, "thresholds": [0.5]}))
    base = {"DYMU_THRESHOLDS": str(thresholds)} if settings.VARIANTS[name].dymu else {}
    unchanged = outcome(name, base)
    for key, value in {**SETTING_VALUES, "DYMU_THRESHOLDS": str(other_thresholds)}.items():
        env = {**base, key: value}
        if key in settings.ignored_settings(name, env):
            assert outcome(name, env) == unchanged, (name, key)
        else:
            assert outcome(name, env) != unchanged, f"{name} reads {key}={value} but it changes nothing"


@pytest.mark.parametrize("name, env, read_with", [
    ("llava_v1.5_7b_fastv", {"SELECT_SEED": "5"}, {"FASTV_SELECT": "random"}),  # attention selection draws nothing
    ("llava_v1.5_7b_pool", {"FASTV_LAYER": "3"}, {"FASTV_K": "32"}),  # no FASTV_K: nothing prunes at a layer
    ("llava_v1.5_7b_pool", {"SELECT_SEED": "5", "FASTV_SELECT": "random"}, {"FASTV_K": "32"}),
])
def test_a_read_setting_that_does_nothing_beside_the_others_is_named(name, env, read_with):
    """A seed sweep over the attention FastV name ran the same setting under one folder, with no word
    that the seed did nothing; the same for a pooling name's FastV settings without FASTV_K."""
    plain = settings.hybrid_config_for(name, {})
    assert settings.hybrid_config_for(name, env) == plain
    effective = settings.effective_name(name, plain)
    note = settings.ignored_note(name, effective, env)
    assert note is not None and all(f"{key}={value}" in note for key, value in env.items()) and note.startswith(f"{name} ignores ")
    with_it, without_it = {**read_with, **env}, dict(read_with)
    assert settings.hybrid_config_for(name, with_it) != settings.hybrid_config_for(name, without_it)  # read once it acts
    assert settings.ignored_note(name, effective, with_it) is None
    for key in env:  # doing nothing is no licence for a malformed value
        with pytest.raises(settings.PluginError, match=f"{name}: {key}='abc' is not valid"):
            settings.hybrid_config_for(name, {**env, key: "abc"})


def test_run_py_names_what_a_name_ignores():
    env = {"FASTV_K": "32", "VISUAL_BUDGET": "128", "DYMU_THRESHOLDS": "x.json"}
    effective = settings.effective_name("llava_v1.5_7b_visionzip", settings.hybrid_config_for("llava_v1.5_7b_visionzip", env))
    assert settings.ignored_note("llava_v1.5_7b_visionzip", effective, env) == (
        "llava_v1.5_7b_visionzip does not read FASTV_K=32, DYMU_THRESHOLDS=x.json (each name reads its own settings): it runs visionzip-b128"
    )
    assert settings.ignored_note("llava_v1.5_7b", "llava_v1.5_7b", {"HYBRID_POSITIONS": "renumbered"}).endswith("it runs stock")
    assert settings.ignored_note("llava_v1.5_7b_fastv", "llava_v1.5_7b_fastv__fastv-k32-l2", {"FASTV_K": "32"}) is None


def test_a_malformed_thresholds_file_is_refused_before_any_model_loads(tmp_path):
    """Its shape is checked when the name's setting is read (exit 2 in run.py), not after the
    model loaded: a dict of thresholds had loaded its keys as the values."""
    path = tmp_path / "edited.json"
    path.write_text(json.dumps({"format": "hybrid-vlm/dymu-thresholds/v2", "split": "official", "model": {},
                                "thresholds": {"0": 0.7, "1": 0.8}}))
    with pytest.raises(settings.PluginError, match=r"DYMU_THRESHOLDS='.*edited.json': .*'thresholds' must be a non-empty list"):
        settings.hybrid_config_for("llava_v1.5_7b_dymu", {"DYMU_THRESHOLDS": str(path)})


@pytest.mark.parametrize("fixture,architecture", [("tiny", "llava"), ("tiny_next", "next"), ("tiny_qwen", "qwen")])
def test_fastv_newlines_is_read_where_it_changes_the_kept_tokens(request, fixture, architecture):
    """FASTV_NEWLINES=keep spares LLaVA-NeXT's image_newline tokens. On a model without them it
    keeps what prune keeps, so the names of that model must not read it (a run under it got a
    folder of its own, tagged newlines-keep, holding the same predictions)."""
    import copy

    import torch

    from hybrid_vlm import apply_hybrid

    from conftest import image_inputs, next_inputs, qwen_inputs
    from test_llava_next import engine_prefill

    model, processor = request.getfixturevalue(fixture)
    inputs = dict(llava=image_inputs, next=next_inputs, qwen=qwen_inputs)[architecture](processor)
    kept = {}
    with torch.no_grad():
        for rule in ("prune", "keep"):
            out, real = engine_prefill(apply_hybrid(copy.deepcopy(model), HybridConfig(fastv_k=8, fastv_newlines=rule)), inputs)
            kept[rule] = out.kept_positions[0][real[0]].tolist()
    changes = kept["prune"] != kept["keep"]
    assert changes == (architecture == "next")
    names = [name for name, variant in settings.VARIANTS.items() if variant.fastv
             and (variant.next if architecture == "next" else variant.qwen if architecture == "qwen" else not (variant.next or variant.qwen))]
    assert names
    for name in names:
        assert ("FASTV_NEWLINES" in settings.settings_read(settings.VARIANTS[name])) == changes, name


def test_next_defaults_before_the_llm_are_the_llava_budgets_as_shares_of_each_span():
    """A LLaVA-NeXT span holds about 1,200 to 2,900 tokens: the LLaVA-1.5 counts (64, 64, 56) kept 2
    to 5% of it, where each method's LLaVA-1.5 default keeps about a tenth of 576. As shares they
    stay matched to each other and to PyramidDrop's."""
    shares = {}
    for method in ("visionzip", "vispruner", "divprune", "pdrop"):
        on_llava = settings.hybrid_config_for(f"llava_v1.5_7b_{method}", {}).visual_budget
        on_next = settings.hybrid_config_for(f"llava_next_vicuna_7b_{method}", {}).visual_budget
        assert isinstance(on_next, float) and on_next == pytest.approx(on_llava / 576, abs=0.002), method
        shares[method] = on_next
    assert max(shares.values()) - min(shares.values()) < 0.02


# PyramidDrop's default layer-average is out of its reach on the tiny models' 4-layer LLMs
SHALLOW_LLM_BUDGETS = {"pdrop": {"VISUAL_BUDGET": "0.5"}}
FAMILY_OF_ARCHITECTURE = {"llava": "llava_v1.5_7b", "next": "llava_next_vicuna_7b", "qwen": "Qwen2.5-VL-7B-Instruct"}


@pytest.mark.parametrize("fixture,architecture", [("tiny", "llava"), ("tiny_next", "next"), ("tiny_qwen", "qwen")])
def test_a_model_names_exactly_the_methods_its_engine_runs(request, fixture, architecture):
    """The method names of a model come from the methods' default budgets (`Method.default_budgets`),
    not from the engine: each name's default setting must run a prefill on that model, and each
    budgeted method the model has no name for must be one its engine refuses as not implemented."""
    import copy

    import torch

    from hybrid_vlm import apply_hybrid
    from hybrid_vlm.methods import get_method, list_methods

    from conftest import image_inputs, next_inputs, qwen_inputs
    from test_llava_next import engine_prefill

    model, processor = request.getfixturevalue(fixture)
    inputs = dict(llava=image_inputs, next=next_inputs, qwen=qwen_inputs)[architecture](processor)
    family = FAMILY_OF_ARCHITECTURE[architecture]
    named = {method for variant in settings.VARIANTS.values() if variant.family == family for method in variant.methods}
    budgeted = {name for name in list_methods() if get_method(name).budget_setting == "VISUAL_BUDGET"}
    assert named & budgeted
    with torch.no_grad():
        for method in sorted(budgeted):
            if method in named:
                config = settings.hybrid_config_for(f"{family}_{method}", SHALLOW_LLM_BUDGETS.get(method, {}))
                out, real = engine_prefill(apply_hybrid(copy.deepcopy(model), config), inputs)
                assert 0 < real.sum() < inputs["input_ids"].numel(), method  # it ran, and it cut
            else:
                config = HybridConfig(visual_method=method, visual_budget=64)
                with pytest.raises((ValueError, NotImplementedError), match="not (implemented|available) for"):
                    engine_prefill(apply_hybrid(copy.deepcopy(model), config), inputs)


def test_thresholds_of_another_tower_shape_are_refused_before_the_model_loads():
    """The testbed's thresholds on the tiny LLaVA: caught by the weights' fingerprint after the load
    (run.py then exited 1 beside a folder whose status said done); the shapes differ in config.json."""
    from hybrid_vlm.testbed import testbed_checkpoint
    from hybrid_vlm.tiny import ensure_tiny_llava, ensure_tiny_thresholds

    testbed_mid = settings.testbed_thresholds("mid")
    with pytest.raises(settings.PluginError, match=r"calibrated for a vision tower of shape clip-h96-l6-a3-i336-p14-read5, "
                                                   r"and this checkpoint's is clip-h64-l3-a4-i336-p14-read2"):
        settings.check_thresholds_shape(ensure_tiny_llava(), HybridConfig(dymu=str(testbed_mid)))
    settings.check_thresholds_shape(testbed_checkpoint(), HybridConfig(dymu=str(testbed_mid)))  # its own: accepted
    settings.check_thresholds_shape(ensure_tiny_llava(), HybridConfig(dymu=str(ensure_tiny_thresholds())))
