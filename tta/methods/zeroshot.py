"""Zero-shot CLIP: the baseline every method is compared with (Radford et al., 2021)."""

from __future__ import annotations

from dataclasses import dataclass

from tta.features import encode_images, zeroshot_logits
from tta.methods.base import Method, MethodInput, MethodOptions, MethodOutput, register
from tta.views import base_view, normalize


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

    def predict(self, request: MethodInput) -> MethodOutput:
        clip = self.clip
        with request.timer.stage("augment"):
            view = normalize(base_view(request.image.to(clip.device), clip.image_size), clip.mean, clip.std)
        with request.timer.stage("encode"):
            feats = encode_images(clip, view.unsqueeze(0))
        with request.timer.stage("predict"):
            probs = zeroshot_logits(clip, feats, request.text_features).softmax(-1)[0]
        return MethodOutput(probs=probs, zeroshot_probs=probs, image_features=feats[0])
