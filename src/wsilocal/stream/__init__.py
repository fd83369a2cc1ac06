"""The trunk's streaming engine: how an image larger than memory goes through the frozen-BatchNorm trunk exactly.

Below both training and inference. ``slide/`` reads pixels; this package turns them into the trunk's map:

* :mod:`.sources` — where the trunk's input comes from (:class:`~.sources.ImageSource`: a slide file read at
  the target MPP, an array or memory map, a tensor), one window at a time;
* :mod:`.geometry` — each layer's (kernel, stride, padding), the footprint of a run of blocks, and the plan of
  windows whose kept parts are exact and partition the output;
* the forward passes over those plans, and the memory estimates that choose between them.
"""
