"""The exact strings the VLMEvalKit plugin sends, so the testbed is trained on what it is asked.

`conversation` is `vlmeval_plugin.model.HybridLLaVA.conversation` for one image followed by text;
`mcq_text` is `llava_mcq_prompt` for a row without a hint; `CAPTION_PROMPT` is VLMEvalKit's
ImageCaptionDataset question. tests/test_testbed.py checks all three against the plugin.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
)
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CAPTION_PROMPT = (
    "Please describe this image in general. Directly provide the description, "
    'do not include prefix like "This image depicts". '
)
LETTERS = "ABCD"


def conversation(text: str) -> str:
    return SYSTEM_PROMPT + "USER: " + " <image> " + text + " ASSISTANT: "


def mcq_text(question: str, options: tuple[str, ...]) -> str:
    lines = [question] + [f"{LETTERS[i]}. {option}" for i, option in enumerate(options)]
    return "\n".join(lines) + "\n" + MCQ_INSTRUCTION
