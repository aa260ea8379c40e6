# Convenience targets; scripts/serve.sh is the source of truth for serving.
MODEL ?= ViT-B-16:openai
NAME ?= clip

.PHONY: serve archive test-serving k8s image monitoring drift-dashboard soak docs docs-gen docs-serve docs-screenshots gpu-check gpu-check-dry-run gpu-wheels

serve:  ## install, build the archive, run TorchServe in the foreground (MODEL=tiny-random offline)
	MODEL=$(MODEL) NAME=$(NAME) bash scripts/serve.sh

archive:  ## build model_store/$(NAME).mar only
	.venv/bin/tta archive --model $(MODEL) --name $(NAME) --out model_store -f

test-serving:  ## real-TorchServe integration tests
	.venv/bin/pytest -q tests/integration

k8s:  ## render both kustomize overlays offline
	kubectl kustomize k8s/overlays/gpu >/dev/null && kubectl kustomize k8s/overlays/cpu

image:  ## build the container image with buildah (IMAGE=..., BASE_IMAGE=...; Docker: docker build .)
	bash scripts/build_image.sh

monitoring:  ## regenerate Prometheus rules, PrometheusRule and Grafana dashboard from monitoring/rules.py
	.venv/bin/python -m monitoring.rules

drift-dashboard:  ## live TorchServe + Prometheus run; draws docs/img/drift-dashboard.png from its data
	mkdir -p docs/img
	TTA_DRIFT_PICTURE=$(CURDIR)/docs/img/drift-dashboard.png .venv/bin/pytest -q -m extended tests/integration/test_monitoring_live.py

soak:  ## bounded mixed load (3,000 requests, hostile inputs included) on 127.0.0.1; writes bench/results/soak.json
	.venv/bin/python -m bench.soak --requests $(or $(REQUESTS),3000) --concurrency $(or $(CONCURRENCY),8) --max-seconds $(or $(SECONDS_MAX),900)

docs:  ## build the documentation site strictly into site/ (broken links or anchors fail)
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

docs-gen:  ## regenerate docs/reference/* and the generated regions of docs/ from the code and bench/results
	.venv/bin/python scripts/gen_docs.py

docs-serve:  ## preview the site on http://127.0.0.1:8000 (rebuilds on save)
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs serve --dev-addr 127.0.0.1:8000

docs-screenshots:  ## headless-Chromium screenshots of the built site (desktop + phone) into site-shots/; refreshes docs/img/site-tpt.png
	bash scripts/docs_screenshots.sh site-shots
	cp site-shots/tpt-desktop.png docs/img/site-tpt.png

PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
GPU_OUT ?= bench/results/gpu.json

gpu-check:  ## on one CUDA GPU (<= 8 min): every GPU figure -> $(GPU_OUT) + .md (docs/gpu-check.md)
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(PYTHON) -m bench.gpu_check --out $(GPU_OUT)

gpu-check-dry-run:  ## the same plan on CPU with tiny sizes (seconds; the default suite runs it too)
	PYTHONPATH=$(CURDIR) $(PYTHON) -m bench.gpu_check --dry-run

gpu-wheels:  ## the wheels a GPU machine lacks, into .whl/ (carried by the device run; docs/gpu-check.md)
	bash scripts/gpu_wheels.sh
