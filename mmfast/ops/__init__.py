"""Functional API: argument checks, backend choice, autograd and fake impls, one module per op
(mmfast.ops.<op>.<op> is the function; the package does not re-export them, so `mmfast.ops.<op>`
stays the module)."""
