"""Float64 references written plainly in PyTorch, one module per family, and the
self-checks that compare the kernels with them."""
