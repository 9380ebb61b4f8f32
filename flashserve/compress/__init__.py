"""Model compression tools that write model directories flashserve serves like any other.

* ``prune``: magnitude / Wanda unstructured, 2:4 semi-structured, structured heads and MLP channels;
* ``lowrank``: truncated, activation-aware SVD served as two thin linears;
* ``distill``: a shallower student trained on its teacher's generated text (white or black box);
* ``calibration`` / ``packed`` / ``model_io``: calibration statistics, cache-free forward passes,
  reading sources and writing directories; ``evaluate``: quality against the source on real text;
* benches: ``speed`` (GPU speed), ``sweep`` (quality table), ``cascade_eval`` (cascade inference,
  flashserve.engine.cascade).

The commands: ``flashserve compress prune|lowrank``, ``flashserve distill``, ``flashserve bench
compress|compress-quality|cascade``.
"""
