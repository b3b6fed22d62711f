"""Triton kernels, one file per op: private @triton.jit kernels, launchers, torch.library.custom_op wrappers."""
