"""Structured output: grammars (JSON schema, regex, EBNF) that constrain which tokens a request may sample."""
