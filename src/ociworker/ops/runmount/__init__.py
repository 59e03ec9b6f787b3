"""The RUN --mount types that need more than a Mount value: cache dirs,
secret files and ssh agent sockets."""
