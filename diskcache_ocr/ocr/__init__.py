"""The OCR side: annotations, decoding, transforms and DBNet maps (pure functions, no LMDB)."""
