"""Neuron models: frozen backbone features, per-site readouts, metrics, encoders, synthesis.

Plain PyTorch + numpy; nothing here imports the server, the rig or any web/database code.

Modules:
    backbones  registry of frozen networks (built-in ``alexnet``, ``torchvision:NAME``, ``timm:NAME``)
    features   preprocessing, truncated backbones (``Trunk``), batched extraction with a disk cache
    readouts   factorized and ridge readouts, fitted for all sites at once; ensembles
    metrics    cross-validated r, split-half reliability (ceiling), noise-corrected EV
    encoder    ``Encoder``: trunk + readout, differentiable wrt pixels (the synthesis seam)
    artifact   one-file save/load of a fitted encoder (safetensors + JSON metadata)
    fit        ``fit_model``: the high-level entry point used by the worker
"""
