"""The transformers release gate: which releases import, and the bypass for porting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from hybrid_vlm.hf_compat import (
    SUPPORTED_TRANSFORMERS,
    UNTESTED_TRANSFORMERS_ENV,
    check_transformers_version,
    is_supported_transformers,
)
from hybrid_vlm.hf_compat.versions import next_minor


@pytest.mark.parametrize("version", ["5.23.0", "5.23.4", "5.24.0", "5.24.1", "5.25.0", "5.25.0.dev0"])
def test_tested_releases_import(version):
    assert is_supported_transformers(version)
    check_transformers_version(version, environ={})


@pytest.mark.parametrize("version", ["5.22.2", "5.26.0", "5.26.0.dev0", "6.0.0", "4.57.6", "5.2.0", "5.230.0"])
def test_other_releases_are_refused_with_the_range(version):
    with pytest.raises(ImportError, match=r"supports transformers 5\.23\.x to 5\.25\.x only, found " + version.replace(".", r"\.")) as error:
        check_transformers_version(version, environ={})
    assert "pip install 'transformers>=5.23,<5.26'" in str(error.value)
    assert "patches/README.md" in str(error.value)


def test_bypass_imports_an_untested_release_with_a_warning():
    with pytest.warns(UserWarning, match=r"5\.26\.0 because HYBRID_VLM_ALLOW_UNTESTED_TRANSFORMERS=1"):
        check_transformers_version("5.26.0", environ={UNTESTED_TRANSFORMERS_ENV: "1"})
    with pytest.raises(ImportError):
        check_transformers_version("5.26.0", environ={UNTESTED_TRANSFORMERS_ENV: "0"})


REPO = Path(__file__).parents[1]


def declared_transformers(requirements: list[str]) -> Requirement:
    (requirement,) = [Requirement(line) for line in requirements if line.startswith("transformers")]
    return requirement


@pytest.mark.parametrize("source", ["pyproject.toml", "requirements-eval.txt"])
def test_declared_range_matches_the_gate(source):
    """pip must keep every release the import gate accepts, and install nothing it refuses."""
    text = (REPO / source).read_text()
    if source == "pyproject.toml":
        tomllib = pytest.importorskip("tomllib")  # Python 3.11+
        requirement = declared_transformers(tomllib.loads(text)["project"]["dependencies"])
    else:
        requirement = declared_transformers([line.strip() for line in text.splitlines()])
    oldest, newest = SUPPORTED_TRANSFORMERS
    for version in (f"{oldest}.0", f"{newest}.0", f"{newest}.3"):
        assert requirement.specifier.contains(version), (source, str(requirement), version)
    for version in ("5.22.2", f"{next_minor(newest)}.0", "6.0.0"):
        assert not requirement.specifier.contains(version), (source, str(requirement), version)


def shell_assignment(path: Path, pattern: str) -> str:
    found = re.search(pattern, path.read_text(), re.M)
    assert found is not None, f"{path.name}: no line matching {pattern}"
    return found.group(1)


def test_install_and_ci_cover_every_supported_release():
    """install.sh defaults to the newest supported release, on which CI runs the whole suite; .ci/run
    then runs the engine tests on each older supported minor release, none left out."""
    oldest, newest = SUPPORTED_TRANSFORMERS
    assert shell_assignment(REPO / "install.sh", r"^TRANSFORMERS=\$\{TRANSFORMERS:-([^}]+)\}$") == f"{newest}.*"
    older = shell_assignment(REPO / ".ci" / "run", r"^OLDER_TRANSFORMERS=\(([^)]*)\)$").split()
    expected, release = [], oldest
    while release != newest:
        expected.append(f"{release}.*")
        release = next_minor(release)
    assert older == expected


def test_checkpoints_load_without_hub_kernels():
    """transformers 5.25 kernelizes from_pretrained models by default (a hub rotary kernel inside
    LlamaAttention on CUDA), which the engine's layer loop does not call: the stock model would no
    longer be its reference. The loaders ask for none (use_kernels was True here without it)."""
    from hybrid_vlm.model import load_supported_model
    from hybrid_vlm.testbed import load_for_training
    from hybrid_vlm.tiny import ensure_tiny_llava

    checkpoint = ensure_tiny_llava()
    assert load_supported_model(str(checkpoint)).use_kernels is False
    assert load_for_training(checkpoint)[0].use_kernels is False


MODEL_LOAD = re.compile(r"\b(\w*(?:Model|ForConditionalGeneration|ForImageTextToText|model_class))\.from_pretrained\(")


def call_arguments(text: str, start: int) -> str:
    """The text between the parenthesis opening at `start` and its match (calls may span lines)."""
    depth = 0
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            return text[start + 1 : end]
    return text[start + 1 :]


def test_every_model_load_in_the_code_asks_for_no_hub_kernels():
    """A source check, so a new loader cannot bring them back (on a machine without the `kernels`
    package, 5.25's default even fails the load): each model class's from_pretrained call in the
    package, the plugin, the tools, the tests and the reports' scripts passes NO_HUB_KERNELS (or, in
    the test of the refusal, use_kernels explicitly)."""
    calls = []
    for folder in ("hybrid_vlm", "vlmeval_plugin", "hybrid_tools", "tests", "reports"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for match in MODEL_LOAD.finditer(text):
                where = f"{path.relative_to(REPO)}:{text.count(chr(10), 0, match.start()) + 1}"
                arguments = call_arguments(text, match.end() - 1)
                calls.append((where, "NO_HUB_KERNELS" in arguments or "use_kernels=" in arguments))  # never the default
    assert len(calls) >= 15, calls
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]


def test_a_model_loaded_with_hub_kernels_is_refused_unpatched():
    """A user's own from_pretrained on 5.25 kernelizes the model by default: the engine would run the
    kernelized norms and activations but not the rotary kernel, and match neither stock nor itself
    elsewhere. apply_hybrid refuses it, naming the fix, and leaves the model stock; after
    reset_kernels() (5.25) it is accepted. On 5.23 and 5.24 the flag kernelize sets stands in for a
    kernelized load (their `kernels` range is not this environment's)."""
    from transformers import LlavaForConditionalGeneration

    from hybrid_vlm import HybridConfig, apply_hybrid
    from hybrid_vlm.hf_compat import TRANSFORMERS_RELEASE
    from hybrid_vlm.tiny import build_tiny_llava, ensure_tiny_llava

    if TRANSFORMERS_RELEASE >= (5, 25):
        model = LlavaForConditionalGeneration.from_pretrained(str(ensure_tiny_llava()), use_kernels=True)  # 5.25's default, explicit
    else:
        model, _ = build_tiny_llava()
        model._use_kernels = True
    assert model.use_kernels
    with pytest.raises(ValueError, match=r"loaded with hub kernels.*use_kernels=False"):
        apply_hybrid(model, HybridConfig(fastv_k=8))
    assert type(model) is LlavaForConditionalGeneration and not hasattr(model, "hybrid_config")
    if TRANSFORMERS_RELEASE >= (5, 25):
        model.reset_kernels()
        assert type(apply_hybrid(model, HybridConfig(fastv_k=8))).__name__ == "HybridLlavaForConditionalGeneration"


def test_a_model_dispatched_over_devices_is_refused_unpatched(tmp_path):
    """A device_map spanning devices (here the LLM offloaded to disk, which works on a CPU) makes
    accelerate hook the top module with the stock forward as an instance attribute: the class swap
    then reported a patched model that ran stock. apply_hybrid refuses it, naming the one-device
    load, and leaves it stock; so does a hook on one device's model (the same attribute)."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from transformers import LlavaForConditionalGeneration

    from hybrid_vlm import HybridConfig, apply_hybrid
    from hybrid_vlm.tiny import build_tiny_llava, ensure_tiny_llava

    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model": "disk", "lm_head": "cpu"}
    model = LlavaForConditionalGeneration.from_pretrained(
        str(ensure_tiny_llava()), use_kernels=False, device_map=device_map, offload_folder=str(tmp_path)
    )
    assert "forward" in vars(model)  # what made the swap silent
    with pytest.raises(ValueError, match=r"dispatched by accelerate \(devices \['cpu', 'disk'\]\).*device_map=\{\"\": \"cuda:0\"\}"):
        apply_hybrid(model, HybridConfig(fastv_k=8))
    assert type(model) is LlavaForConditionalGeneration and not hasattr(model, "hybrid_config")
    hooked, _ = build_tiny_llava()
    add_hook_to_module(hooked, AlignDevicesHook(io_same_device=True))
    with pytest.raises(ValueError, match="an accelerate hook on its forward"):
        apply_hybrid(hooked, HybridConfig(fastv_k=8))
    for one_device in ("auto", {"": "cpu"}):  # what users on one GPU pass: no dispatch, no hook, accepted
        model = LlavaForConditionalGeneration.from_pretrained(str(ensure_tiny_llava()), use_kernels=False, device_map=one_device)
        assert "forward" not in vars(model)
        assert type(apply_hybrid(model, HybridConfig(fastv_k=8))).__name__ == "HybridLlavaForConditionalGeneration"


def test_a_refused_apply_leaves_the_settings_and_thresholds_it_found(tmp_path):
    """apply_hybrid set the DyMU thresholds before its checks: a refused re-apply then ran the old
    settings with the new file's thresholds, and a re-apply without DyMU kept the old ones."""
    from hybrid_vlm import HybridConfig, apply_hybrid
    from hybrid_vlm.tiny import build_tiny_llava, ensure_tiny_thresholds

    model, _ = build_tiny_llava()
    first = HybridConfig(dymu=str(ensure_tiny_thresholds()), fastv_k=8)
    apply_hybrid(model, first)
    thresholds = model.hybrid_thresholds
    with pytest.raises(ValueError, match="FASTV_LAYER=9"):
        apply_hybrid(model, HybridConfig(dymu=str(ensure_tiny_thresholds()), fastv_k=8, fastv_layer=9))
    assert model.hybrid_config is first and model.hybrid_thresholds is thresholds
    apply_hybrid(model, HybridConfig(fastv_k=8))
    assert "hybrid_thresholds" not in vars(model)
    stock, _ = build_tiny_llava()
    with pytest.raises(ValueError, match="FASTV_LAYER=9"):
        apply_hybrid(stock, HybridConfig(dymu=str(ensure_tiny_thresholds()), fastv_layer=9, fastv_k=8))
    assert not {"hybrid_config", "hybrid_thresholds"} & set(vars(stock))


def test_the_upstream_sources_the_engine_mirrors_are_the_ones_read():
    """The import gate accepts every patch release of a supported minor: a patch release that changes
    a function the engine copies, calls for its maths or overrides fails here, naming it, until its
    change is read and its fingerprint recorded (hybrid_vlm/hf_compat/mirrored.py)."""
    from hybrid_vlm.hf_compat import mirrored

    assert set(mirrored.FINGERPRINTS) == {"5.23", "5.24", "5.25"}
    assert all(set(recorded) == set(mirrored.MIRRORED) for recorded in mirrored.FINGERPRINTS.values())
    assert mirrored.changed_sources() == []
    assert mirrored.changed_sources("5.23" if mirrored.running_release() != "5.23" else "5.25")  # the releases do differ


def test_the_first_apply_warns_naming_a_changed_upstream_source(monkeypatch):
    """A patch release that changes a mirrored function passes the import gate: the first
    apply_hybrid of a process says which, once; an unchanged release says nothing."""
    from hybrid_vlm import HybridConfig, apply_hybrid, remove_hybrid
    from hybrid_vlm.hf_compat import mirrored
    from hybrid_vlm.tiny import build_tiny_llava

    model, _ = build_tiny_llava()
    spec = mirrored.MIRRORED[0]
    release = mirrored.running_release()
    monkeypatch.setitem(mirrored.FINGERPRINTS, release, {**mirrored.FINGERPRINTS[release], spec: "0" * 16})
    mirrored.warn_if_changed.cache_clear()
    with pytest.warns(UserWarning, match=re.escape(spec)):
        apply_hybrid(model, HybridConfig(fastv_k=8))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_hybrid(remove_hybrid(model), HybridConfig(fastv_k=8))  # once per process
    monkeypatch.undo()
    mirrored.warn_if_changed.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mirrored.warn_if_changed() == []


def test_the_source_check_stays_quiet_on_an_untested_release_and_says_when_sources_cannot_be_read(monkeypatch):
    """An untested release (let in by the import gate's bypass, which warns itself) has nothing
    recorded to compare with: no second warning listing every function. Sources that cannot be read
    (a bytecode-only install) are said to be unchecked, not reported as changed."""
    import warnings

    from hybrid_vlm.hf_compat import mirrored

    monkeypatch.setattr(mirrored, "running_release", lambda: "5.22")
    mirrored.warn_if_changed.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mirrored.warn_if_changed() == []
    monkeypatch.undo()

    def unreadable(module):
        raise OSError("could not get source code")

    monkeypatch.setattr(mirrored.inspect, "getsource", unreadable)
    mirrored.warn_if_changed.cache_clear()
    with pytest.warns(UserWarning, match="could not read transformers' sources"):
        assert mirrored.warn_if_changed() == []
    monkeypatch.undo()
    mirrored.warn_if_changed.cache_clear()
    assert mirrored.fingerprint("transformers.models.no_such_model.modeling:Thing.forward") == "absent"


def test_a_fingerprint_reads_the_definition_not_a_runtime_wrapper(tmp_path, monkeypatch):
    """5.25 replaces module functions such as apply_rotary_pos_emb with kernel `Func` modules at import:
    the fingerprint is of the source text of the definition, decorators included, and a method a class
    does not define is recorded as absent."""
    from hybrid_vlm.hf_compat import mirrored

    (tmp_path / "fake_upstream.py").write_text(
        "import functools\n\n\ndef helper(x):\n    return x + 1\n\n\nclass Layer:\n"
        "    @functools.lru_cache\n    def forward(self, x):\n        return helper(x)\n\n\nhelper = object()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert mirrored.source_of("fake_upstream:helper") == "def helper(x):\n    return x + 1"
    assert mirrored.source_of("fake_upstream:Layer.forward") == (
        "    @functools.lru_cache\n    def forward(self, x):\n        return helper(x)")
    assert mirrored.fingerprint("fake_upstream:Layer.backward") == "absent"


def test_the_engine_output_reads_like_stock_without_image_features():
    """The engine's forward returns no image features: `image_hidden_states` is None on every
    release (5.24 made it a property reading `image_outputs`, which raised AttributeError), and the
    cache is under generate's name for the release."""
    import torch

    from hybrid_vlm import HybridConfig, apply_hybrid
    from hybrid_vlm.hf_compat import CACHE_NAME, output_cache
    from hybrid_vlm.tiny import build_tiny_llava, synthetic_image

    model, processor = build_tiny_llava()
    apply_hybrid(model, HybridConfig(fastv_k=8))
    inputs = processor(images=[synthetic_image(0)], text=["USER: <image>\nwhat is it? ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert out.image_hidden_states is None
    assert getattr(out, CACHE_NAME) is output_cache(out) and output_cache(out).get_seq_length() > 0


def test_window_features_in_train_mode_drop_attention_as_stock():
    """The testbed's window phase runs the CLIP tower through its own loop in train mode: that loop
    called SDPA without dropout, where stock drops with the config's attention_dropout."""
    import torch

    from hybrid_vlm.hf_compat.clip import window_image_features
    from hybrid_vlm.hf_compat.llava import stock_image_features
    from hybrid_vlm.tiny import build_tiny_llava, synthetic_image

    model, processor = build_tiny_llava()
    for module in model.model.vision_tower.modules():
        if type(module).__name__ == "CLIPAttention":
            module.dropout = 0.5  # what attention_dropout=0.5 in the vision config sets
    pixels = processor(images=[synthetic_image(0)], text=["USER: <image>\nx ASSISTANT:"], return_tensors="pt")["pixel_values"]
    whole_image = torch.zeros(1, 2, dtype=torch.long)  # one window: the full grid
    with torch.no_grad():
        model.train()
        torch.manual_seed(3)
        stock = stock_image_features(model, pixels)
        torch.manual_seed(3)
        ours = window_image_features(model, pixels, whole_image)
        model.eval()
        undropped = window_image_features(model, pixels, whole_image)
    assert torch.allclose(ours, stock, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, undropped, rtol=1e-2, atol=1e-2)  # the draws really dropped


def test_the_engine_refuses_train_mode_with_attention_dropout():
    import torch

    from hybrid_vlm import HybridConfig, apply_hybrid
    from hybrid_vlm.tiny import build_tiny_llava, synthetic_image

    model, processor = build_tiny_llava()
    apply_hybrid(model, HybridConfig(fastv_k=8))
    inputs = processor(images=[synthetic_image(0)], text=["USER: <image>\nwhat is it? ASSISTANT:"], return_tensors="pt")
    model.train()  # no dropout configured: train mode changes nothing, so it runs
    with torch.no_grad():
        model(**inputs)
        model.config.text_config.attention_dropout = 0.1
        with pytest.raises(NotImplementedError, match=r"attention_dropout=0.1: call model.eval\(\)"):
            model(**inputs)
        model.eval()
        model(**inputs)


def test_packed_decoder_states_refuse_an_llm_that_adds_the_mask():
    """Eager attention adds a 4-D mask to the scores: a bool mask (True = may attend) masked nothing."""
    import torch

    from hybrid_vlm.hf_compat.llava import packed_decoder_states
    from hybrid_vlm.tiny import build_tiny_llava

    model, _ = build_tiny_llava(attn_implementation="eager")
    embeds = torch.randn(1, 5, model.config.text_config.hidden_size)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    with pytest.raises(ValueError, match="attn_implementation='sdpa'.*'eager'"):
        packed_decoder_states(model, embeds, causal, torch.arange(5)[None])


def test_dynamic_rope_is_named_as_a_host_read():
    """transformers' dynamic RoPE compares the largest position id with its cache on the host at each
    rotary call: the engine warns that such a model is not sync-free, and the sync check agrees."""
    import warnings

    from transformers import LlavaForConditionalGeneration

    from hybrid_vlm import HybridConfig, apply_hybrid
    from hybrid_vlm.syncs import check_no_host_syncs
    from hybrid_vlm.tiny import build_processor, build_tiny_llava, synthetic_image, tiny_llava_config

    processor = build_processor()
    config = tiny_llava_config(processor.tokenizer)
    config.text_config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    dynamic = LlavaForConditionalGeneration(config).eval()
    inputs = processor(images=[synthetic_image(0)], text=["USER: <image>\nwhat is it? ASSISTANT:"], return_tensors="pt")
    with pytest.warns(UserWarning, match="dynamic scaling.*not free of host syncs"):
        apply_hybrid(dynamic, HybridConfig(fastv_k=8))
    with pytest.warns(UserWarning, match="dynamic scaling"):  # the check runs a patched copy
        assert check_no_host_syncs(dynamic, dict(inputs)).startswith("fail")

    plain, _ = build_tiny_llava()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_hybrid(plain, HybridConfig(fastv_k=8))
    assert check_no_host_syncs(plain, dict(inputs)) == "pass"
