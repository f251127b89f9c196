"""Export a FedCoE model (arXiv 2605.21264) to an ONNX device bundle (docs/design.md, section 7).

* :mod:`export.onnx_export`: one ONNX graph per part plus the fused dense graph;
* :mod:`export.quantize`: static int8 QDQ / dynamic int8, chosen per part;
* :mod:`export.bundle`: the bundle folder (or .tar) with its manifest;
* :mod:`export.cli`: ``fedcoe export`` and ``fedcoe predict``.

The device side is :mod:`fedcoe_edge.runtime` (onnxruntime and numpy, no torch). Nothing is
imported here so that ``fedcoe --help`` stays fast.
"""
