"""Compression methods: one file each, one registry (`METHODS`), one protocol (`Method`).

A method turns one MoE layer's routed experts into what the converted checkpoint stores. The
layer-by-layer pipeline (molae/convert.py) knows nothing of any method; per layer it calls

    spec = method.plan(shape, opts)                # sizes from the options alone, before any data
    s2   = method.spectra(W, inputs, spec, opts)   # {kind: squared singular values}: only methods that
                                                   # allocate a --budget across layers (`allocates`)
    out  = method.convert(W, inputs, spec, opts)   # a LayerOutput

with W {kind: [E, m, n] (gate, up) or [E, n, m] (down)} on the device in the source dtype, and
`inputs` the layer's calibration inputs (`calibrate.LayerInputs`, captured on the carried hidden
states) or None. What a method declares:

    calibration  "none", "optional" or "required"
    latent       writes MoLAE experts (a molae_<family> checkpoint) rather than the family's layout
    prunes       changes the expert count (the router's rows are dropped, the config's count edited)
    allocates    --budget is spread over layers and kinds from `spectra` (a first pass over the layers)

Adding a method: a file here with a `Method` subclass, registered at the bottom of this file; it
appears in `molae convert --method`, in `molae bench quality` and in the README's table.
"""

from .base import METHODS, LayerOutput, LayerShape, Method, dense_rows, get, register, standard_module
from . import d2moe, hcsmoe, mobe, molae, pruning, svd  # noqa: E402,F401  (each registers itself)

__all__ = ["Method", "LayerShape", "LayerOutput", "METHODS", "register", "get", "dense_rows", "standard_module"]
