"""Server-agnostic serving layer: the request codec and the runner every server adapter shares.

`codec` turns request bodies into typed requests (or typed failures) and answers into JSON;
`service` builds the worker (model, labels, Engine, metrics) and runs decoded requests. The
adapters (handlers/clip_tta_handler.py for TorchServe, `tta.serving.kserve_model` for KServe)
only translate their server's request/response objects, so both answer the same bytes with the
same status codes and count the same metrics.
"""
