"""The torch side: reward heads, the PyTorch reward model, export to ONNX (trace → ORT passes → verify →
artifact), the ArmoRM importer and the parity check. Needs the `train` extra; the runtime never imports it."""
