"""Low-level helpers every package may use; they import nothing of the engine
(only ``ociworker.errors`` and the pure values of ``ociworker.core``)."""
