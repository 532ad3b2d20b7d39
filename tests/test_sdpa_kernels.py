"""The profiler reading of which SDPA backend each layer ran (hybrid_tools.sdpa_kernels), checked
against a spy on the engine's own SDPA calls and the layer order they must come in."""

from __future__ import annotations

import pytest
import torch

import hybrid_vlm.hf_compat.llava as llava_compat
from hybrid_tools import bench
from hybrid_tools.sdpa_kernels import SdpaCall, profile_sdpa, summarize_phase

from conftest import QUESTIONS, hybrid_copy, image_inputs

DECODE_STEPS = 2


def run_phases(model, inputs):
    """(prefill, decode) callables the profiler runs, as the bench's trace runs them: a prefill, then
    DECODE_STEPS greedy steps on its cache."""
    return lambda: bench.prefill(model, inputs), lambda output: bench.decode(model, output, inputs["attention_mask"], DECODE_STEPS)


@pytest.mark.parametrize("questions", [QUESTIONS[:1], QUESTIONS[:2]], ids=["batch1", "padded-batch2"])
@pytest.mark.parametrize("settings", [dict(), dict(fastv_k=64)], ids=["vanilla", "fastv64"])
def test_trace_matches_a_spy_layer_by_layer(tiny, monkeypatch, questions, settings):
    """Every LLM SDPA call the engine makes is found, in layer order 0..L-1 per forward, with the
    mask flag the call really carried; the vision tower's calls come only in the prefill."""
    model, processor = tiny
    hybrid = hybrid_copy(model, **settings)
    masked_by_call = []
    original = llava_compat.scaled_dot_product_attention

    def spy(*args, attn_mask=None, **kwargs):
        masked_by_call.append(attn_mask is not None)
        return original(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(llava_compat, "scaled_dot_product_attention", spy)
    inputs = image_inputs(processor, questions)
    with torch.no_grad():
        calls = profile_sdpa(hybrid, *run_phases(hybrid, inputs), torch.device("cpu"))

    layers = model.config.text_config.num_hidden_layers
    llm_calls = [c for c in calls if c.layer is not None]
    assert [c.phase for c in llm_calls] == ["prefill"] * layers + ["decode"] * layers * DECODE_STEPS
    assert [c.layer for c in llm_calls] == list(range(layers)) * (1 + DECODE_STEPS)
    assert [c.masked for c in llm_calls] == masked_by_call
    assert any(masked_by_call) == (len(questions) > 1)  # padding is what needs the mask here
    vision = [c for c in calls if c.layer is None]
    assert vision and all(c.phase == "prefill" for c in vision)
    assert all(c.backend == "flash-cpu" for c in calls)  # what torch 2.x runs on CPU for fp32, mask or not


def test_stock_transformers_is_traced_the_same_way(tiny):
    """The markers sit on modules the stock forward runs too: one call per LLM layer per forward."""
    model, processor = tiny
    inputs = image_inputs(processor, QUESTIONS[:1])
    with torch.no_grad():
        calls = profile_sdpa(model, *run_phases(model, inputs), torch.device("cpu"))
    layers = model.config.text_config.num_hidden_layers
    assert [c.layer for c in calls if c.layer is not None] == list(range(layers)) * (1 + DECODE_STEPS)


def test_phase_summary_joins_runs_of_layers_that_ran_alike():
    calls = [SdpaCall("prefill", None, "math", False)] * 3 + [
        SdpaCall("prefill", 0, "flash", False), SdpaCall("prefill", 1, "flash", False),
        SdpaCall("prefill", 2, "efficient", True), SdpaCall("prefill", 3, "efficient", True),
        SdpaCall("prefill", 4, "flash", False),
        SdpaCall("decode", 0, "flash", False), SdpaCall("decode", 1, "flash", False),
        SdpaCall("decode", 0, "flash", False), SdpaCall("decode", 1, "math", True),
    ]
    assert summarize_phase(calls, "prefill") == "vision 3x math; L0-1 flash; L2-3 efficient+mask; L4 flash"
    assert summarize_phase(calls, "decode") == "L0 flash; L1 flash/math+mask"  # steps that disagree show both
    assert summarize_phase(calls[:3], "decode") == "no SDPA calls"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA side of the trace (device events beside host ones)")
def test_cuda_trace_places_every_call_and_names_a_cuda_backend(tiny):
    model, processor = tiny
    hybrid = hybrid_copy(model, fastv_k=64).to("cuda")
    inputs = {key: value.to("cuda") for key, value in image_inputs(processor, QUESTIONS[:1]).items()}
    with torch.no_grad():
        calls = profile_sdpa(hybrid, *run_phases(hybrid, inputs), torch.device("cuda"))
    layers = model.config.text_config.num_hidden_layers
    llm_calls = [c for c in calls if c.layer is not None]
    assert [c.layer for c in llm_calls] == list(range(layers)) * (1 + DECODE_STEPS)
    assert all(c.backend in {"flash", "efficient", "cudnn", "math"} and not c.masked for c in llm_calls), {c.backend for c in llm_calls}
