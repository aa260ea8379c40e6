# Convenience targets; scripts/serve.sh is the source of truth for serving.
MODEL ?= ViT-B-16:openai
NAME ?= clip

.PHONY: serve archive test-serving k8s

serve:  ## install, build the archive, run TorchServe in the foreground (MODEL=tiny-random offline)
	MODEL=$(MODEL) NAME=$(NAME) bash scripts/serve.sh

archive:  ## build model_store/$(NAME).mar only
	.venv/bin/tta archive --model $(MODEL) --name $(NAME) --out model_store -f

test-serving:  ## real-TorchServe integration tests
	.venv/bin/pytest -q tests/integration

k8s:  ## render both kustomize overlays offline
	kubectl kustomize k8s/overlays/gpu >/dev/null && kubectl kustomize k8s/overlays/cpu
