"""jaxscale: JAX-accelerated, differentiable scaling of X-ray diffraction data.

float64 is the default so that results match DIALS; set JAXSCALE_X64=0 before import
for float32 throughput runs.
"""
import os as _os

import jax as _jax

if _os.environ.get("JAXSCALE_X64", "1") != "0":
    _jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"
