"""The main-process TokenizerManager and the per-rank schedulers."""
