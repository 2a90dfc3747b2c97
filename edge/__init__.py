"""Plant side of a release: the edge model store (approved models, the one in use, the ones before it) and
the HTTP inference server that serves the store's current model with onnxruntime and swaps it without
dropping a request; it speaks maxfl's /v1 and KServe's Open Inference Protocol v2, exports Prometheus metrics
and serves the plant's page."""
