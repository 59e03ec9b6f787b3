"""The worker's op handlers, one file per op type (``source``, ``exec``,
``file``), the table that picks one for a vertex (``registry``), the parts they
draw on (``parts``), what they share about local contexts (``context``), and
the pieces of work they call (``fileactions``, ``untar``, ``runmount``).

Adding an op type is one new file here plus one line in ``registry.HANDLERS``
(see ``ociworker.ops.registry``).
"""
