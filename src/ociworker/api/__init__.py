"""The gRPC boundary: the daemon's server, its client and the session stream.

The only package that imports grpc (tests/test_layering.py). Errors are mapped
here once: ``errors.py`` turns an ``OciworkerError`` into a status code plus an
``ErrorDetail`` in trailing metadata, and back into the same class.
"""
