"""OpenAI-compatible server: HTTP app, workers (serial, continuous batching), scheduler."""
