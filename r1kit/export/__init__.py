"""Export: ONNX (``onnx``: torch.onnx.export + the ONNX Runtime greedy loop that verifies it) and TFLite
(``tflite``: Google's litert-torch converter, when it installs)."""

from r1kit.export.onnx import ExportError, OrtGreedy, export_checkpoint, export_onnx, make_exportable

__all__ = ["ExportError", "OrtGreedy", "export_checkpoint", "export_onnx", "make_exportable"]
