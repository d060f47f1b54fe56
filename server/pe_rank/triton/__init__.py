"""The server's side of Triton: client calls to the models and the embedded launcher.

What runs inside Triton's Python models is ``pe_rank.triton_backend``.
"""
