"""Exporters: a sliced GraphModule -> a deployable, validated file."""

from .onnx import ExportReport, export_onnx, onnx_latency, read_metadata

__all__ = ["ExportReport", "export_onnx", "onnx_latency", "read_metadata"]
