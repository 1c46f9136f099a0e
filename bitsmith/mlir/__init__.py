"""MLIR interop through the upstream MLIR Python bindings (package torch-mlir, extra ``mlir``)."""
