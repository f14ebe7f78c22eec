"""Extraction: frozen-backbone features through the on-disk cache (features, cache, device and
ranks), local-feature pooling (GeM, VLAD) and augmented views of training images."""
