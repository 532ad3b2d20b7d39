"""One AdamW step of the text-only letter probes (letter_mapping.py, text_letters.py): right-padded
token sequences through a causal LM under bf16 autocast, cross-entropy on the option letters only,
gradients clipped to norm 1."""
import torch


def letter_step(model, optimizer, pad_id: int, sequences: list[list[int]], rows, columns, targets, rate: float) -> tuple[torch.Tensor, float]:
    """sequences: token ids; (rows[n], columns[n]) the logit that predicts letter targets[n] -> (loss, accuracy)."""
    length = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), length), pad_id)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)], mask[row, : len(ids)] = torch.tensor(ids), 1
    for group in optimizer.param_groups:
        group["lr"] = rate
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=input_ids, attention_mask=mask).logits[rows, columns].float()
    loss = torch.nn.functional.cross_entropy(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss, float((logits.argmax(-1) == targets).float().mean())
