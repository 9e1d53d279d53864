"""Names the earthobs command line offers as choices. They live here, free of torch, because every
fm-* command builds the parsers of every domain; the modules that implement them import them from here."""

from __future__ import annotations

INIT_MODES = ("random", "rgb_map", "repeat", "band_select")  # first-layer adaptation (earthobs.models)
DATASETS = ("bigearthnet", "bigearthnet-v1", "bigearthnet-v2", "eurosat", "ssl4eo-s12", "demo")  # earthobs.prepare
DTYPES = ("float16", "float32", "uint16")  # packed cache dtypes (earthobs.packed)
PROTOCOLS = ("linear", "knn", "last4")  # frozen-encoder protocols (earthobs.evaluate)
NAN_POLICIES = ("raise", "zero")  # NaN/inf/nodata pixels in GeoTIFFs: stop, or fill with 0 (earthobs.readers)
