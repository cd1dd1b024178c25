"""KV cache memory and the radix prefix cache."""
