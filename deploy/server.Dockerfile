# The pe-rank gRPC/HTTP server: CPU only, no torch (the server's import path is torch-free and the
# `server` extra does not pull torch; the build checks that). Reads the tokenizer files and sizes
# from the model repository mounted at /models; talks to Triton over gRPC.
#
#   docker build -f deploy/server.Dockerfile -t REGISTRY/pe-rank-server:0.1.0 .
#
# Not built or run by this project's CI: no container engine there (see README).
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/pe-rank
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY export ./export

# the gRPC stubs are generated (git-ignored), as `make protos` does
RUN python -m pip install 'grpcio-tools>=1.62' \
 && python -m grpc_tools.protoc -Iprotos --python_out=server --grpc_python_out=server --pyi_out=server \
        protos/pe_rank/v1/*.proto \
 && python -m grpc_tools.protoc --proto_path=pe_rank/tei=protos/tei --python_out=server \
        --grpc_python_out=server --pyi_out=server protos/tei/v1/tei.proto \
 && python -m pip install '.[server]' \
 && python -c 'import importlib.util, sys; sys.exit("torch was installed: the server image must not carry it") \
        if importlib.util.find_spec("torch") else None' \
 && python -c 'import sys, pe_rank.service.server; sys.exit("importing the server loaded torch") \
        if "torch" in sys.modules else None'

USER 10001
EXPOSE 50051 8080 9090
ENTRYPOINT ["pe-rank"]
CMD ["serve", "--repository=/models", "--host=0.0.0.0"]
