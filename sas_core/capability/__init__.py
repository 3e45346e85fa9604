"""Annotation-free model capability (SAS section 3.2): how well each 2D teacher segments each class.

* ``tables``       - ``CapabilityTable`` (JSON with provenance, atomic save, validated load) and the
                     intersection/union accumulator.
* ``diffusion``    - Stable Diffusion synthesis with cross-attention capture -> coarse masks.
* ``pseudo_masks`` - three distance-transform prompt points -> SAM pseudo-masks.
* ``sources``      - reference images + masks (diffusion, synthetic probes, a user folder) and
                     ``build_table`` which runs the teachers on them.

Only ``tables`` is imported here (NumPy only); the others load torch/diffusers/segment_anything when
used.
"""

from sas_core.capability.tables import CapabilityAccumulator, CapabilityTable

__all__ = ["CapabilityTable", "CapabilityAccumulator"]
