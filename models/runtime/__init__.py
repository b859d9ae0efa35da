"""The torch-free runtime: what a serving box runs. Items and the input builder, batching, the ONNX Runtime
session and the `Scorer`, the artifact and its manifest, objectives and errors.

The dependency rule: modules here import only each other (and numpy, pydantic, tokenizers, transformers'
tokenizer classes, onnxruntime); never torch, `polyreward.models.torch`, training or service.
"""
