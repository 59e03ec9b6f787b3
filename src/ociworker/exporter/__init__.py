"""Exporters: a build's result -> layers, images and the build outputs.

``base`` has the ``Exporter`` Protocol and what an export sees; ``exporters``
maps each output type to its exporter (``containerimage``, ``imagearchive``,
``local``, ``tar``, ``layers``). ``chain`` turns snapshots into layer blobs,
``assemble`` layers into an image (written by ``image``); ``imagestore`` names
images; ``target`` is where outputs are written. The writers of files,
``ocilayout`` (OCI / docker image tars) and ``fs`` (a directory, a tar of the
files), are imported by the exporters that write them, on use.
"""
