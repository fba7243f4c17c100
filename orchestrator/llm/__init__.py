"""The OpenAI-compatible model endpoint, through the openai SDK."""
