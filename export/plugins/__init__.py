"""TensorRT plugins: Triton kernels (kernels.py), PyTorch references (reference.py), the plugin graph
pass (graph_pass.py), its CPU executor (executor.py) and the tensorrt.plugin registration (register.py,
imported only where TensorRT is installed). Nothing is imported here: each module pulls its own deps."""
