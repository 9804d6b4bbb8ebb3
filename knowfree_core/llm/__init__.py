"""LLM engines, prompt answers and their parsing, for label extension and synthesis."""
