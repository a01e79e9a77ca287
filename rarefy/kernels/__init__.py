"""Leaf math: Triton kernels, each with the pure-torch reference that is its test oracle and
CPU fallback. Modules here import nothing else from rarefy; set ``TRITON_INTERPRET=1`` before
importing one to run its kernel without a GPU. triton itself is optional (``rarefy[triton]``):
without it the references import and run, and a kernel launch says what to install."""
