"""Test doubles and GPU-check helpers, not tests and not benchmarks: the stand-in for TensorRT's compiled core
(trt_standin), a minimal tensorrt.plugin for a GPU machine without NVIDIA's package (qdp_minimal) and the CUDA
driver launcher of the AOT PTX (cuda_launch). benchmarks/gpu_check.py (make gpu-check) imports them on a GPU
machine's bare python3, so they import nothing from tests/ outside this folder (tests/test_project_imports.py)."""
