"""Zero-shot CLIP: the baseline every method is compared with (Radford et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass

from tta.features import encode_images, original_view, zeroshot_logits
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, register


@dataclass(frozen=True)
class ZeroShotOptions(MethodOptions):
    """No options: one view (resize + center crop), the label set's class embeddings."""


@register
class ZeroShot(Method):
    name = "zeroshot"
    scope = "episodic"
    Options = ZeroShotOptions
    description = "plain CLIP, one forward pass; the cheapest and the reference for the others"
    batch_encoding = "original"
    manages_own_deadline = True  # it is the fallback itself

    def predict(self, request: MethodInput) -> MethodOutput:
        clip = self.clip
        with request.timer.stage("augment"):
            view = original_view(clip, request.image)
        with request.timer.stage("encode"):
            feats = encode_images(clip, view)
        with request.timer.stage("predict"):
            probs = zeroshot_logits(clip, feats, request.text_features).softmax(-1)[0]
        return MethodOutput(probs=probs, zeroshot_probs=probs, image_features=feats[0])
