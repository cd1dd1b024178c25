"""OpenAI-compatible API: request schemas and the adapters from them to the TokenizerManager."""
