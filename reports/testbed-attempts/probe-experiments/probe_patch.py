import torch
from hybrid_vlm.testbed.train import *
from hybrid_vlm.testbed.train import _accuracy
SW=3.0
class P(ObjectProbe):
    def loss(self, features: torch.Tensor, owner: torch.Tensor, objects: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """features [N, 576, D], owner [N, 576], objects [N, K, 3] -> (mean of the heads' losses, accuracies)."""
        features = features.float()
        on_object = owner > 0
        weights = torch.where(on_object, 1.0, BACKGROUND_WEIGHT).flatten()
        owned = objects.gather(1, (owner - 1).clamp(min=0)[..., None].expand(-1, -1, 3))  # [N, 576, 3]
        patch_class = torch.where(on_object[..., None], owned + 1, 0)
        losses, accuracy = [], {}
        for name, head, target in (("patch_colour", self.patch_colour, patch_class[..., 0]), ("patch_shape", self.patch_shape, patch_class[..., 1])):
            logits = head(features)  # [N, 576, C]
            each = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
            losses.append((each * weights).sum() / weights.sum() * (SW if name=="patch_shape" else 1))
            accuracy[name] = _accuracy(logits[on_object], target[on_object])
        membership = torch.nn.functional.one_hot(owner, MAX_OBJECTS + 1)[..., 1:].float()  # [N, 576, K]
        object_means = membership.transpose(1, 2) @ features / membership.sum(1)[..., None].clamp(min=1)  # [N, K, D]
        present = (objects[..., 0] >= 0) & (membership.sum(1) > 0)
        for index, (name, head) in enumerate(zip(("object_colour", "object_shape", "object_size"), self.object_heads)):
            logits, target = head(object_means[present]), objects[..., index][present]
            losses.append(torch.nn.functional.cross_entropy(logits, target) * (SW if name=="object_shape" else 1))
            accuracy[name] = _accuracy(logits, target)
        count_logits, count_target = self.count(features.mean(1)), (objects[..., 0] >= 0).sum(1) - 1
        losses.append(torch.nn.functional.cross_entropy(count_logits, count_target))
        accuracy["count"] = _accuracy(count_logits, count_target)
        losses.append(torch.nn.functional.mse_loss(self.place(features), self.grid.expand(features.shape[0], -1, -1)))
        return sum(losses) / len(losses), accuracy


