"""Export a trained DMR run to inference artifacts: ONNX graphs (FP32, FP16, static INT8 Q/DQ), V', and
TensorRT engines, each proven against the torch model by the gates in `gates.py`.

    from dmrx.export.pipeline import ExportOptions, export_run
    manifest = export_run("runs/2024...", ExportOptions(fp16=True, int8=True, check_tensorrt=True))

Modules: graphs (torch -> ONNX, the three graphs), fp16 (FP16 with FP32 islands), int8 (quantize_static
QDQ), lint (the TensorRT rules, `--check-tensorrt`), gates (parity, quality, timing), pipeline (the
command), tensorrt (engine build + runtime; optional, import-guarded).

Verified where: everything but TensorRT runs and is tested on CPU (ONNX Runtime CPU EP). The TensorRT
builder/runtime code is written to the TensorRT 10.12+/11 API but has not been run by these tests: TensorRT
cannot be installed on the build machines, and its tests skip with the reason.
"""
