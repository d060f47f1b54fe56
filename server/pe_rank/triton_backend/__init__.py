"""Code that runs inside Triton's Python-backend models (model_repository/*/1/model.py).

The server's side of Triton (its client calls and the embedded launcher) is ``pe_rank.triton``.
"""
